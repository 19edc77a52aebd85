"""Fused computations (all, and distinct once names are set aside), HLO lines and temp bytes
of each chain + adam's compiled train step, with the optclip of another checkout:

    PYTHONPATH=. python bench/results/cpu_sum_scales/counts.py CHECKOUT gpt2,resnet50 \\
        clip_by_global_norm,clip_by_leaf_norm,clip_by_block_rms,agc,adagc,zclip,clip_by_value

``CHECKOUT``: a ``git worktree`` of the commit to count (its ``optclip`` is imported; this
checkout's ``bench`` builds the chains). Deterministic: no timing.
"""
import sys

import jax

sys.path.insert(0, sys.argv[1])
import optclip  # noqa: E402

assert optclip.__file__.startswith(sys.argv[1]), optclip.__file__

from bench.clippers import entries  # noqa: E402
from bench.compile_probe import fused_counts  # noqa: E402
from bench.run import train_step  # noqa: E402
from bench.trees import TREES, abstract_tree  # noqa: E402

reg = entries()
for tree_name in sys.argv[2].split(","):
    tree = abstract_tree(TREES[tree_name]())
    for name in sys.argv[3].split(","):
        tx = reg[name].chain()
        compiled = train_step(tx).lower(tree, jax.eval_shape(tx.init, tree), tree).compile()
        text = compiled.as_text()
        fused, distinct = fused_counts(text)
        temp = compiled.memory_analysis().temp_size_in_bytes
        print(f"{tree_name:9s} {name:22s} fused {fused:5d} distinct {distinct:4d} "
              f"HLO lines {text.count(chr(10)):6d} temp {temp / 2**20:6.2f} MiB", flush=True)
