"""What XLA:CPU compiles for one optclip checkout: temporaries, kernels, instructions.

    python bench/results/cpu_split_trace/compiled.py CHECKOUT TREES NAMES

For each tree (``bench.trees``) and entry (``bench.clippers``): the chain + adam's train
step, or on a ``many*`` tree the update alone (as ``python -m bench`` compiles them); its
temporary bytes, fused computations (all, distinct: ``bench.compile_probe.fused_counts``),
instructions, and those of a few kinds. Run it at two checkouts and compare the lines.
"""

import collections
import re
import sys
from pathlib import Path

CHECKOUT = str(Path(sys.argv[1]).resolve())
sys.path.insert(0, CHECKOUT)
sys.path.insert(1, str(Path(__file__).resolve().parents[3]))

import jax  # noqa: E402

import optclip  # noqa: E402
from bench.clippers import entries  # noqa: E402
from bench.compile_probe import fused_counts  # noqa: E402
from bench.run import temp_bytes, train_step  # noqa: E402
from bench.trees import TREES, abstract_tree  # noqa: E402


def main() -> None:
    assert optclip.__file__.startswith(CHECKOUT), optclip.__file__
    reg = entries()
    for tree_name in sys.argv[2].split(","):
        tree = abstract_tree(TREES[tree_name]())
        alone = tree_name.startswith("many")
        for name in sys.argv[3].split(","):
            tx = reg[name].alone() if alone else reg[name].chain()
            state = jax.eval_shape(tx.init, tree)
            fn = (jax.jit(lambda u, s, p, tx=tx: tx.update(u, s, p), donate_argnums=(0, 1))
                  if alone else train_step(tx))
            compiled = fn.lower(tree, state, tree).compile()
            text = compiled.as_text()
            ops = collections.Counter(re.findall(r"= \S+ (\w[\w-]*)\(", text))
            kinds = {k: ops[k] for k in ("concatenate", "gather", "reduce", "copy", "slice")}
            print(f"{tree_name} {name}: temp {temp_bytes(compiled):,} B, fused/distinct "
                  f"{fused_counts(text)}, instructions {sum(ops.values()):,} {kinds}", flush=True)


if __name__ == "__main__":
    main()
