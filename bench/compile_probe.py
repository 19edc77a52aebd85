"""First calls of chains + adam, each in a fresh process, against another checkout of optclip.

One first call (trace + lower + compile) varies by about 1 s from run to run on a shared
machine, more than most compile-time changes this library makes. This probe compiles each
chain's donated train step (as ``python -m bench`` does) in a fresh process, ``--reps``
times, interleaving the chains and the two checkouts in a shuffled order, and prints the
medians, and the medians of its trace + lower part (Python's work, before XLA's). It also
prints the number of fused computations in the compiled step, and of
distinct ones (names set aside: XLA:CPU compiles identical kernels once), which do not vary.

    python -m bench.compile_probe [--trees gpt2,resnet50] [--clippers a,b] [--reps 3]
        [--against DIR] [--alone]

``--against DIR``: a second checkout (a ``git worktree`` of an earlier commit) whose
``optclip`` the same chains are compiled with, side by side. Optax's entries are compiled
once, with this checkout.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fused_counts(hlo: str, kinds: tuple[str, ...] = ("%fused", "%wrapped")) -> tuple[int, int]:
    """(fused computations, distinct ones once names and metadata are set aside) in compiled
    HLO text; ``kinds``: the prefixes of the computations counted (XLA:CPU names a lone
    gather or broadcast that it compiles as a kernel ``%wrapped_...``)."""
    bodies: collections.Counter = collections.Counter()
    for comp in re.split(r"\n(?=%\S+ |ENTRY )", hlo):
        if comp.startswith(kinds):
            body = re.sub(r"metadata=\{[^}]*\}", "", comp.split("{", 1)[1])
            bodies[re.sub(r"%[\w.\-]+", "%x", body)] += 1
    return sum(bodies.values()), len(bodies)


def one(tree_name: str, name: str, alone: bool = False) -> dict:
    """In this process: the first call of ``name``'s chain + adam on ``tree_name`` (with
    ``alone``, of its ``update`` alone, as the many-leaves trees of ``python -m bench``)."""
    import jax

    from bench.clippers import entries
    from bench.run import train_step
    from bench.trees import TREES, abstract_tree

    reg = entries()
    # warm-up: the first compile in a process pays one-off costs
    tiny = abstract_tree(TREES["tiny"]())
    warm = reg["adam"].chain()
    train_step(warm).lower(tiny, jax.eval_shape(warm.init, tiny), tiny).compile()
    tree = abstract_tree(TREES[tree_name]())
    tx = reg[name].alone() if alone else reg[name].chain()
    state = jax.eval_shape(tx.init, tree)
    t0 = time.perf_counter()
    if alone:
        lowered = jax.jit(lambda u, s, p: tx.update(u, s, p), donate_argnums=(0, 1)).lower(
            tree, state, tree)
    else:
        lowered = train_step(tx).lower(tree, state, tree)
    lower_s = time.perf_counter() - t0
    compiled = lowered.compile()
    secs = time.perf_counter() - t0
    n, d = fused_counts(compiled.as_text())
    import optclip

    return {"first_call_s": secs, "lower_s": lower_s, "fused": n, "distinct": d,
            "optclip": str(Path(optclip.__file__).resolve().parents[1])}


def _run(src: Path, tree_name: str, name: str, alone: bool) -> dict:
    # this checkout's bench, then src's optclip (imported only inside ``one``)
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); "
            "from bench.compile_probe import one; "
            f"sys.path.insert(0, {str(src)!r}); "
            f"print('RESULT ' + json.dumps(one({tree_name!r}, {name!r}, {alone!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tempfile.gettempdir(), timeout=900, check=False)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode or not line:
        raise RuntimeError(r.stderr[-2000:])
    out = json.loads(line[0][len("RESULT "):])
    if Path(out["optclip"]) != src.resolve():
        raise RuntimeError(f"imported optclip from {out['optclip']}, not {src}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", default="gpt2,resnet50")
    ap.add_argument("--clippers", default="clip_by_global_norm,clip_by_leaf_norm,"
                    "clip_by_block_rms,agc,adagc,optax.clip_by_block_rms,"
                    "optax.adaptive_grad_clip")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--against", default=None, help="another checkout of optclip")
    ap.add_argument("--alone", action="store_true",
                    help="compile each transformation's update alone, not its chain + adam")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    srcs = {"this": ROOT}
    if args.against:
        srcs["against"] = Path(args.against).resolve()
    tasks = []
    for tree_name in args.trees.split(","):
        for name in args.clippers.split(","):
            for label in (["this"] if name.startswith("optax") else list(srcs)):
                tasks.append((tree_name, name, label))
    print(f"this: {ROOT}; against: {srcs.get('against')}; {len(tasks)} chains, "
          f"{args.reps} rounds, each first call in a fresh process", flush=True)
    rng = random.Random(args.seed)
    got: dict = collections.defaultdict(list)
    lowers: dict = collections.defaultdict(list)
    counts: dict = {}
    for rep in range(args.reps):
        order = tasks[:]
        rng.shuffle(order)
        for tree_name, name, label in order:
            r = _run(srcs[label], tree_name, name, args.alone)
            got[(tree_name, name, label)].append(r["first_call_s"])
            lowers[(tree_name, name, label)].append(r["lower_s"])
            counts[(tree_name, name, label)] = (r["fused"], r["distinct"])
            print(f"round {rep + 1}: {tree_name} {name} [{label}] first call "
                  f"{r['first_call_s']:.2f} s (trace + lower {r['lower_s']:.2f} s), "
                  f"fused {r['fused']}, distinct {r['distinct']}",
                  flush=True)
    what = "update alone" if args.alone else "chain + adam"
    print(f"\n| tree | {what} | checkout | first call, median (all) | of which trace + lower "
          "| fused | distinct |")
    print("|---|---|---|---|---|---|---|")
    for key in tasks:
        ts = got[key]
        print(f"| {key[0]} | `{key[1]}` | {key[2]} | {statistics.median(ts):.2f} s "
              f"({', '.join(f'{t:.2f}' for t in ts)}) | {statistics.median(lowers[key]):.2f} s "
              f"| {counts[key][0]} | {counts[key][1]} |")


if __name__ == "__main__":
    main()
