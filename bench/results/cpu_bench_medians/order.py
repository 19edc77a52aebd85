"""First calls of chains + adam on ResNet-50 in one process, JAX's caches cleared before
each, in the order given, for the given number of rounds (is a slow first call in the
benchmark an order effect?).

    PYTHONPATH=. python bench/results/cpu_bench_medians/order.py A,B,C ROUNDS
"""

import sys

import jax

from bench import run as bench_run
from bench.clippers import entries
from bench.trees import TREES, make_tree

reg = entries()
params = make_tree(TREES["resnet50"](), seed=1, scale=0.1)
bench_run._warm_up()
p_s = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
order = sys.argv[1].split(",")
for r in range(int(sys.argv[2])):
    for k in order:
        tx = reg[k].chain()
        s_s = jax.eval_shape(tx.init, p_s)
        jax.clear_caches()
        _, lower, comp = bench_run.lower_and_compile(bench_run.train_step(tx), p_s, s_s, p_s)
        print(r, k, f"{lower + comp:.2f} (lower {lower:.2f})", flush=True)
