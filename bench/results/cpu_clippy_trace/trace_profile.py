"""cProfile of the trace + lowering of adam + clippy on one tree, after a warm-up lowering of
the global-norm chain: the cumulative seconds of clippy's update and of its per-piece work.

    PYTHONPATH=CHECKOUT python bench/results/cpu_clippy_trace/trace_profile.py TREE
"""
import cProfile
import pstats
import sys

import jax

from bench.clippers import entries
from bench.run import train_step
from bench.trees import TREES, abstract_tree

reg = entries()
tree = abstract_tree(TREES[sys.argv[1]]())
warm = reg["clip_by_global_norm"].chain()
train_step(warm).lower(tree, jax.eval_shape(warm.init, tree), tree)
tx = reg["clippy"].chain()
state = jax.eval_shape(tx.init, tree)
prof = cProfile.Profile()
prof.enable()
train_step(tx).lower(tree, state, tree)
prof.disable()
stats = pstats.Stats(prof).stats
for (path, _, name), (_, calls, _, cum, _) in sorted(stats.items(), key=lambda kv: -kv[1][3]):
    if "optclip" in path and name in ("update_fn", "_one_pass", "_ratios", "blue_terms",
                                      "_quotient", "split_flat", "_apply"):
        print(f"{sys.argv[1]} {name:12s} {calls:5d} calls {cum:6.3f} s")
