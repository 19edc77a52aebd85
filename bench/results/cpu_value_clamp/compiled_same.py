"""An MD5 of the program XLA:CPU compiles for ``clip_by_value``'s chains (GPT-2, ResNet-50)
and update alone (1,000 leaves), at one optclip checkout; compare the lines of two runs.

    python bench/results/cpu_value_clamp/compiled_same.py CHECKOUT

The text is hashed without its metadata (op names, source lines, and the tables of file
and function names and stack frames), and with its instructions' and computations'
names made anonymous: they name the Python that traced it.
"""

import hashlib
import re
import sys
from pathlib import Path

CHECKOUT = str(Path(sys.argv[1]).resolve())
sys.path.insert(0, CHECKOUT)
sys.path.insert(1, str(Path(__file__).resolve().parents[3]))

import jax  # noqa: E402

import optclip  # noqa: E402
from bench.clippers import entries  # noqa: E402
from bench.run import train_step  # noqa: E402
from bench.trees import TREES, abstract_tree  # noqa: E402


def main() -> None:
    assert optclip.__file__.startswith(CHECKOUT), optclip.__file__
    reg = entries()
    for tree_name in ("gpt2", "resnet50", "many1000"):
        tree = abstract_tree(TREES[tree_name]())
        for name in ("clip_by_value", "clip_by_value_clamping"):
            alone = tree_name.startswith("many")
            tx = reg[name].alone() if alone else reg[name].chain()
            state = jax.eval_shape(tx.init, tree)
            fn = (jax.jit(lambda u, s, p, tx=tx: tx.update(u, s, p), donate_argnums=(0, 1))
                  if alone else train_step(tx))
            text = fn.lower(tree, state, tree).compile().as_text()
            text = re.sub(r", metadata=\{[^}]*\}", "", text)
            text = "\n".join(ln for ln in text.splitlines()
                             if not re.match(r'(\d+ |FileNames|FunctionNames|FileLocations'
                                             r'|StackFrames)', ln))
            # and the names of instructions and computations (from the traced op names)
            text = re.sub(r"%[\w.\-]+", "%x", text)
            text = re.sub(r"(fused_computation|wrapped|region|fusion|body|cond|branch)[\w.\-]*",
                          r"\1", text)
            print(tree_name, name, hashlib.md5(text.encode()).hexdigest(), len(text))


if __name__ == "__main__":
    main()
