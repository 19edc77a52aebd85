"""Which part of optclip's first call the hand-fused references lack: each chain + adam's
first call with optclip.norms' overflow rescue (its ``lax.cond``s) as shipped, and with only
their fast branch traced (``bench.gn_probe.no_cond("fast")``, which would also take the
false branch of ``norms._written_out``'s cond, negating the per-leaf factors and dropping
that barrier; here ``_written_out`` keeps the real cond: not overflow-safe, a diagnostic),
each in a fresh process, rounds interleaved (``--alone``: each update alone, as
``python -m bench``'s many-leaves trees compile it).

    PYTHONPATH=. python bench/results/cpu_compile_floors/ablate.py --trees gpt2,resnet50 \\
        --clippers clip_by_global_norm,clip_by_value,clippy --reps 5      # rescue_5.log
    PYTHONPATH=. python bench/results/cpu_compile_floors/ablate.py --alone --trees many1000 \\
        --clippers clip_by_global_norm,agc,clippy,clip_by_leaf_norm --reps 3  # rescue_many1000.log

(``ablate_5.log`` and ``ablate_many1000.log`` were taken with these commands before
``_written_out`` kept its cond, and ``ablate_gpt2.log`` with ``--trees gpt2 --clippers
clip_by_global_norm,clip_by_leaf_norm,adagc,clip_by_value,clippy --reps 3``: they measure
the rescue and that barrier together, a record, not evidence.)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

CODE = """
import contextlib, json, sys
sys.path.insert(0, {root!r})
from bench.compile_probe import one
from bench.gn_probe import no_cond
from optclip import norms as _n
real_lax, real_written_out = _n.lax, _n._written_out


def written_out(v):  # the barrier, with the real lax.cond while no_cond is in force
    patched, _n.lax = _n.lax, real_lax
    try:
        return real_written_out(v)
    finally:
        _n.lax = patched


_n._written_out = written_out
# the patch holds while compile_probe.one traces (its warm-up chain, adam alone, has no cond)
with no_cond("fast") if {mode!r} == "fast" else contextlib.nullcontext():
    r = one({tree!r}, {name!r}, {alone!r})
print("RESULT " + json.dumps(dict(s=r["first_call_s"], lower=r["lower_s"], fused=r["fused"],
                                  distinct=r["distinct"])))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trees", default="gpt2")
    ap.add_argument("--clippers", default="clip_by_global_norm,clip_by_leaf_norm")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--alone", action="store_true",
                    help="each transformation's update alone, not its chain + adam")
    args = ap.parse_args()
    tasks = [(t, c, m) for t in args.trees.split(",") for c in args.clippers.split(",")
             for m in ("shipped", "fast")]
    res: dict = {k: [] for k in tasks}
    rng = random.Random(0)
    for r in range(args.reps):
        rng.shuffle(tasks)
        for t, c, m in tasks:
            out = subprocess.run([sys.executable, "-c", CODE.format(root=str(ROOT), tree=t, name=c,
                                                                    mode=m, alone=args.alone)],
                                 capture_output=True, text=True, check=True)
            x = json.loads(out.stdout.split("RESULT ", 1)[1])
            res[(t, c, m)].append(x)
            print(f"round {r + 1}: {t} {c} {m}: {x['s']:.2f} s (lower {x['lower']:.2f} s), "
                  f"fused {x['fused']}, distinct {x['distinct']}", flush=True)
    what = "update alone" if args.alone else "chain + adam"
    print(f"\n| tree | {what} | norms' cond | first call, median (all) | fused | distinct |")
    print("|---|---|---|---|---|---|")
    for t in args.trees.split(","):
        for c in args.clippers.split(","):
            for m in ("shipped", "fast"):
                xs = res[(t, c, m)]
                s = [x["s"] for x in xs]
                print(f"| {t} | `{c}` | {m} | {statistics.median(s):.2f} s "
                      f"({', '.join(f'{v:.2f}' for v in s)}) | {xs[0]['fused']} | "
                      f"{xs[0]['distinct']} |")


if __name__ == "__main__":
    main()
