"""Chains + adam, lowered and compiled in one process, rounds alternating the order:

    PYTHONPATH=. python bench/results/cpu_not_taken/chain_first_call.py TREE NAMES ROUNDS

Prints the medians of trace + lowering and of XLA's compile (``NAMES`` from
``bench.clippers``)."""
import statistics
import sys
import time

import jax

from bench.clippers import entries
from bench.run import train_step
from bench.trees import TREES, abstract_tree

reg = entries()
tree = abstract_tree(TREES[sys.argv[1]]())
names = sys.argv[2].split(",")
res = {n: [] for n in names}
for r in range(int(sys.argv[3])):
    for name in (names if r % 2 == 0 else names[::-1]):
        tx = reg[name].chain()
        t0 = time.perf_counter()
        low = train_step(tx).lower(tree, jax.eval_shape(tx.init, tree), tree)
        t1 = time.perf_counter()
        low.compile()
        res[name].append((t1 - t0, time.perf_counter() - t1))
for n in names:
    print(f"{sys.argv[1]} {n}: trace+lower {statistics.median(a for a, _ in res[n]):.2f} s, "
          f"compile {statistics.median(b for _, b in res[n]):.2f} s")
