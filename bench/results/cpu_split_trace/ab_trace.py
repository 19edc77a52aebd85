"""The trace of two optclip checkouts' updates, in one process: Python calls and seconds.

    PYTHONPATH=. python bench/results/cpu_split_trace/ab_trace.py A B TREE NAMES REPS

For each entry of NAMES (``bench.clippers``), its update alone on TREE (``bench.trees``) is
traced (``jax.jit(...).trace``, after ``jax.clear_caches()`` and ``gc.collect()``) under A's
and B's optclip, alternated (A B, B A, ...); medians. The number of Python function calls in
one trace (``cProfile``) is the same on every run: a measure of the trace's work that the
machine's noise does not move.
"""

import cProfile
import gc
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "results" / "cpu_value_clamp"))

import jax  # noqa: E402
from ab_first_call import load  # noqa: E402

from bench.trees import TREES, abstract_tree  # noqa: E402


def trace(reg: dict, name: str, tree, profile: bool = False) -> float:
    tx = reg[name].alone()
    state = jax.eval_shape(tx.init, tree)
    fn = jax.jit(lambda u, s, p: tx.update(u, s, p))
    jax.clear_caches()
    gc.collect()
    if profile:
        pr = cProfile.Profile()
        pr.enable()
        fn.trace(tree, state, tree)
        pr.disable()
        return pstats.Stats(pr).total_calls
    t0 = time.perf_counter()
    fn.trace(tree, state, tree)
    return time.perf_counter() - t0


def main() -> None:
    a, b, tree_name, names, reps = sys.argv[1:6]
    regs = {"A": load(str(Path(a).resolve())), "B": load(str(Path(b).resolve()))}
    tree = abstract_tree(TREES[tree_name]())
    for name in names.split(","):
        calls = {k: trace(reg, name, tree, profile=True) for k, reg in regs.items()}
        secs: dict[str, list[float]] = {"A": [], "B": []}
        for r in range(int(reps)):
            for k in ("A", "B") if r % 2 == 0 else ("B", "A"):
                secs[k].append(trace(regs[k], name, tree))
        ta, tb = (statistics.median(secs[k]) for k in ("A", "B"))
        print(f"{tree_name} {name}: Python calls {calls['A']:,} -> {calls['B']:,} "
              f"({calls['B'] / calls['A'] - 1:+.1%}); trace {ta:.3f} -> {tb:.3f} s", flush=True)


if __name__ == "__main__":
    main()
