"""Trace + lower (Python's work, before XLA's) of updates alone on 1,000 small leaves
(bench's many1000 tree), in one process: four lowerings of each, each of a fresh
transformation and jit; the median of the last three is printed.

Run: PYTHONPATH=CHECKOUT python bench/results/cpu_full_gather/lower_time.py NAMES
     (NAMES: a comma list of bench entries, e.g. clip_by_global_norm,clippy)
"""
import statistics
import sys
import time

import jax

from bench.clippers import entries
from bench.trees import TREES, abstract_tree


def lower_s(name: str, tree) -> float:
    tx = entries()[name].alone()
    st = jax.eval_shape(tx.init, tree)
    f = jax.jit(lambda u, s, p: tx.update(u, s, p), donate_argnums=(0, 1))
    t0 = time.perf_counter()
    f.lower(tree, st, tree)
    return time.perf_counter() - t0


def main() -> None:
    tree = abstract_tree(TREES["many1000"]())
    for name in sys.argv[1].split(","):
        ts = [lower_s(name, tree) for _ in range(4)]
        print(f"{name} lower, median of the last 3: {statistics.median(ts[1:]):.3f} s",
              [round(t, 3) for t in ts])


if __name__ == "__main__":
    main()
