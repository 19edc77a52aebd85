"""First calls of updates alone on 1,000 small leaves in one process, JAX's caches cleared
before each, in the order given, after the bench worker's warm-up (does what a process
compiled before make a first call quicker?).

    PYTHONPATH=. python bench/results/cpu_bench_medians/prior.py A,B,C
"""

import sys

import jax

from bench.clippers import entries
from bench.trees import TREES, abstract_tree
from bench.worker import compile_update

reg = entries()
tree = abstract_tree(TREES["many1000"]())
compile_update(reg["clip_by_global_norm"].alone(), abstract_tree(TREES["tiny"]()))
for name in sys.argv[1].split(","):
    jax.clear_caches()
    lower, comp, _ = compile_update(reg[name].alone(), tree)
    print(name, f"lower {lower:.2f} compile {comp:.2f} first {lower + comp:.2f}", flush=True)
