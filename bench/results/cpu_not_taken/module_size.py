"""The size of a chain + adam's module before XLA's passes (StableHLO ops) and its compiled
kernels by kind, on one tree:

    PYTHONPATH=. python bench/results/cpu_not_taken/module_size.py TREE NAMES
"""
import collections
import re
import sys

import jax

from bench.clippers import entries
from bench.run import train_step
from bench.trees import TREES, abstract_tree

reg = entries()
tree = abstract_tree(TREES[sys.argv[1]]())
for name in sys.argv[2].split(","):
    tx = reg[name].chain()
    low = train_step(tx).lower(tree, jax.eval_shape(tx.init, tree), tree)
    ops = re.findall(r"= \"?([a-z_]+\.[a-z_]+)", low.as_text())
    text = low.compile().as_text()
    entry = text[text.index("ENTRY"):]
    kinds = collections.Counter(
        re.sub(r"[.0-9]+$", "", m) for m in re.findall(r" fusion\(.*calls=%([\w.\-]+)", entry))
    print(f"{sys.argv[1]} {name}: {len(ops)} StableHLO ops "
          f"({', '.join(f'{k} {v}' for k, v in collections.Counter(ops).most_common(8))}); "
          f"compiled kernels: {dict(kinds)}")
