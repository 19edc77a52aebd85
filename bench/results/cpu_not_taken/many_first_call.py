"""``update`` alone, lowered and compiled in one process, on a many-leaves tree, after a
warm-up: PYTHONPATH=CHECKOUT python bench/results/cpu_not_taken/many_first_call.py TREE NAMES

Prints trace + lowering, XLA's compile, and (fused computations, distinct ones)."""
import sys
import time

import jax

from bench.clippers import entries
from bench.compile_probe import fused_counts
from bench.trees import TREES, abstract_tree

reg = entries()
tiny = abstract_tree(TREES["tiny"]())
warm = reg["clip_by_global_norm"].alone()
jax.jit(warm.update).lower(tiny, jax.eval_shape(warm.init, tiny), tiny).compile()
tree = abstract_tree(TREES[sys.argv[1]]())
for name in sys.argv[2].split(","):
    tx = reg[name].alone()
    t0 = time.perf_counter()
    low = jax.jit(tx.update).lower(tree, jax.eval_shape(tx.init, tree), tree)
    t1 = time.perf_counter()
    c = low.compile()
    t2 = time.perf_counter()
    print(f"{sys.argv[1]} {name}: trace+lower {t1 - t0:.2f} s, compile {t2 - t1:.2f} s, "
          f"fused/distinct {fused_counts(c.as_text())}", flush=True)
