"""First call of adam + clippy with this checkout's clippy and with another ``clippy.py``,
alternated in one process, beside the global-norm chain:

    PYTHONPATH=. python bench/results/cpu_not_taken/ab_clippy.py TREE OTHER_CLIPPY_PY ROUNDS

``OTHER_CLIPPY_PY`` is loaded as a module of its own beside this checkout's ``optclip`` (its
imports are this checkout's: use it where only ``clippy.py`` differs). Prints the medians of
trace + lowering, of XLA's compile, and of their total. Rounds alternate the order.
"""
import importlib.util
import statistics
import sys
import time

import jax
import optax

import optclip
from bench.run import train_step
from bench.trees import TREES, abstract_tree

spec = importlib.util.spec_from_file_location("clippy_other", sys.argv[2])
other = importlib.util.module_from_spec(spec)
spec.loader.exec_module(other)
tree = abstract_tree(TREES[sys.argv[1]]())
make = {"this": lambda: optax.chain(optax.adam(1e-3), optclip.clippy(0.1, 1e-7)),
        "other": lambda: optax.chain(optax.adam(1e-3), other.clippy(0.1, 1e-7)),
        "gn": lambda: optax.chain(optclip.clip_by_global_norm(1.0), optax.adam(1e-3))}
res = {k: [] for k in make}
for r in range(int(sys.argv[3])):
    for k in (list(make) if r % 2 == 0 else list(make)[::-1]):
        tx = make[k]()
        t0 = time.perf_counter()
        low = train_step(tx).lower(tree, jax.eval_shape(tx.init, tree), tree)
        t1 = time.perf_counter()
        low.compile()
        t2 = time.perf_counter()
        res[k].append((t1 - t0, t2 - t1))
for k, v in res.items():
    print(f"{sys.argv[1]} {k:5s} trace+lower {statistics.median(a for a, _ in v):.2f} s, "
          f"compile {statistics.median(b for _, b in v):.2f} s, "
          f"total {statistics.median(a + b for a, b in v):.2f} s "
          f"({', '.join(f'{a + b:.2f}' for a, b in v)})")
