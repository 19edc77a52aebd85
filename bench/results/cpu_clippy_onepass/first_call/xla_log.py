"""One compile of a chain + adam on a tree, for XLA's own log of where its time goes:

    TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=cpu_compiler=2,hlo_pass_pipeline=1 PYTHONPATH=. \\
        python bench/results/cpu_clippy_onepass/first_call/xla_log.py clippy resnet50 2> LOG
    grep -E "Running HLO passes on|Compiling: jit|Compile LLVM module|using JIT time" LOG
    grep -c "LLVM verifier" LOG   # LLVM verifier runs (not a count of kernels)
"""
import sys
import time

import jax

from bench.clippers import entries
from bench.run import train_step
from bench.trees import TREES, abstract_tree

tree = abstract_tree(TREES[sys.argv[2]]())
tx = entries()[sys.argv[1]].chain()
lowered = train_step(tx).lower(tree, jax.eval_shape(tx.init, tree), tree)
t = time.perf_counter()
lowered.compile()
print("COMPILE", time.perf_counter() - t, file=sys.stderr)
