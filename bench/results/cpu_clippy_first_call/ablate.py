"""Where `clippy`'s first call goes: the chain adam + clippy compiled with optclip at BASE and
with each of this folder's patches applied to BASE (each takes one part of clippy's work away
or does it another way: the first line of each patch says what), beside the global-norm chain
and the hand-fused Clippy references (compiled with BASE). Each first call in a fresh process
(``bench.compile_probe``), the checkouts interleaved in a shuffled order each round; medians.

    PYTHONPATH=. python bench/results/cpu_clippy_first_call/ablate.py [--base HEAD] \\
        [--patches no_stat,squares,...] [--trees gpt2,resnet50] [--reps 3]

The patched checkouts are ``git worktree``s in a temporary folder, removed at the end. Some
patches make clippy wrong on purpose (no stat, no NaN handling): a measure of what that part
costs to compile, never a candidate.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench.compile_probe import ROOT, _run

HERE = Path(__file__).resolve().parent
REFS = ("clip_by_global_norm", "fused_clippy", "fused_clippy_stat")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="HEAD")
    ap.add_argument("--patches", default=",".join(sorted(p.stem for p in HERE.glob("*.patch"))))
    ap.add_argument("--trees", default="gpt2,resnet50")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    base = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.base],
                          capture_output=True, text=True, check=True).stdout.strip()
    patches = [p for p in args.patches.split(",") if p]
    tmp = Path(tempfile.mkdtemp(prefix="clippy_ablate_"))
    trees: dict[str, Path] = {}
    try:
        for label in ["base", *patches]:
            wt = tmp / label
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(wt),
                            base], check=True)
            if label != "base":
                subprocess.run(["git", "-C", str(wt), "apply", str(HERE / f"{label}.patch")],
                               check=True)
            trees[label] = wt
        # (checkout label, entry): clippy with each checkout; the references with the base
        runs = [(label, "clippy") for label in trees] + [("base", r) for r in REFS]
        tasks = [(t, label, name) for t in args.trees.split(",") for label, name in runs]
        print(f"optclip at {base}; {len(tasks)} first calls a round, {args.reps} rounds, "
              "each in a fresh process", flush=True)
        got: dict = {}
        rng = random.Random(0)
        for rep in range(args.reps):
            order = tasks[:]
            rng.shuffle(order)
            for t, label, name in order:
                r = _run(trees[label], t, name, False)
                got.setdefault((t, label, name), []).append(r)
                print(f"round {rep + 1}: {t} {name} [{label}] {r['first_call_s']:.2f} s "
                      f"(trace + lower {r['lower_s']:.2f} s), fused {r['fused']}, "
                      f"distinct {r['distinct']}", flush=True)
        print("\n| tree | chain + adam | optclip | first call, median (all) | vs clippy at base "
              "| trace + lower | fused | distinct |")
        print("|---|---|---|---|---|---|---|---|")
        for t in args.trees.split(","):
            ref = statistics.median(r["first_call_s"] for r in got[(t, "base", "clippy")])
            for label, name in runs:
                rs = got[(t, label, name)]
                med = statistics.median(r["first_call_s"] for r in rs)
                low = statistics.median(r["lower_s"] for r in rs)
                each = ", ".join(f"{r['first_call_s']:.2f}" for r in rs)
                print(f"| {t} | `{name}` | {label} | {med:.2f} s ({each}) | {med - ref:+.2f} s "
                      f"| {low:.2f} s | {rs[-1]['fused']} | {rs[-1]['distinct']} |")
    finally:
        for wt in trees.values():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(wt)],
                           check=False)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=False)


if __name__ == "__main__":
    main()
