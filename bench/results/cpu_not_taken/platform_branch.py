"""What tracing `lax.platform_dependent`'s branch for other platforms costs on many leaves:
trace + lower of an update alone, as shipped (``norms.split_flat`` traces its CPU branch and
its branch for other platforms, and lowers the CPU's) and with ``split_flat`` patched to
trace the CPU branch alone (what choosing the branch at trace time would do), each in a
fresh process, rounds interleaved:

    PYTHONPATH=. python bench/results/cpu_not_taken/platform_branch.py [--trees many1000]
        [--clippers clippy,agc] [--reps 5]
"""
import argparse
import random
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
CODE = r'''
import sys, time
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp
from bench.clippers import entries
from bench.trees import TREES, abstract_tree
from optclip import norms as _n
import optclip.adaptive, optclip.clippy, optclip.layers
if {mode!r} == "cpu_only":
    def split_flat(flat, lay, full=None):
        if not jnp.issubdtype(flat.dtype, jnp.floating):
            return _n._split_sliced(flat, lay)
        return _n._split_gathered(flat, lay, None if full is None else [tuple(s) for s in full])
    for m in (_n, optclip.adaptive, optclip.clippy, optclip.layers):
        if hasattr(m, "split_flat"):
            m.split_flat = split_flat
reg = entries()
tiny = abstract_tree(TREES["tiny"]()); w = reg["adam"].alone()
jax.jit(lambda u, s, p: w.update(u, s, p)).lower(tiny, jax.eval_shape(w.init, tiny), tiny)
tree = abstract_tree(TREES[{tree!r}]())
tx = reg[{name!r}].alone()
st = jax.eval_shape(tx.init, tree)
t0 = time.perf_counter()
jax.jit(lambda u, s, p: tx.update(u, s, p), donate_argnums=(0, 1)).lower(tree, st, tree)
print("RESULT", time.perf_counter() - t0)
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trees", default="many1000")
    ap.add_argument("--clippers", default="clippy,agc")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    tasks = [(t, c, m) for t in args.trees.split(",") for c in args.clippers.split(",")
             for m in ("shipped", "cpu_only")]
    got: dict = {k: [] for k in tasks}
    rng = random.Random(0)
    for r in range(args.reps):
        rng.shuffle(tasks)
        for t, c, m in tasks:
            out = subprocess.run([sys.executable, "-c", CODE.format(root=str(ROOT), tree=t,
                                                                    name=c, mode=m)],
                                 capture_output=True, text=True, check=True)
            s = float(out.stdout.split("RESULT ")[1])
            got[(t, c, m)].append(s)
            print(f"round {r + 1}: {t} {c} {m}: trace + lower {s:.3f} s", flush=True)
    print("\n| tree | update alone | trace + lower, shipped | CPU branch alone |")
    print("|---|---|---|---|")
    for t in args.trees.split(","):
        for c in args.clippers.split(","):
            a, b = (statistics.median(got[(t, c, m)]) for m in ("shipped", "cpu_only"))
            print(f"| {t} | `{c}` | {a:.3f} s | {b:.3f} s ({b - a:+.3f} s) |")


if __name__ == "__main__":
    main()
