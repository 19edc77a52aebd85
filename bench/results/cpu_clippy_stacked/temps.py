"""clippy's update alone, its compiled temporaries over the tree's bytes, on trees of small
tensors of repeated and of unique sizes, with this checkout's clippy and with another
``optclip/clippy.py`` (loaded beside it, as ``bench.clippy_side`` does).

    PYTHONPATH=. python bench/results/cpu_clippy_stacked/temps.py OLD_CLIPPY_PY [OLD2 ...]
"""

import importlib.util
import sys

import jax

import optclip
from bench.run import temp_bytes
from bench.trees import abstract_tree, mixed_leaves_shapes, tree_bytes

TREES = {
    "240 mixed small leaves (12 sizes, each repeated)": mixed_leaves_shapes(240),
    "one small tensor of 40,000": {"a": (40000,)},
    "one small tensor of 32,769 and one large": {"a": (32769,), "big": (300, 256)},
    "14 sizes 2^k + 1, k = 2..15 (each alone in its width)": {
        f"u{k:02d}": ((1 << k) + 1,) for k in range(2, 16)},
    "50 of 4,097": {f"r{i}": (4097,) for i in range(50)},
    "100 sizes 513..612 (one width: padded)": {f"s{i}": (513 + i,) for i in range(100)},
}


def temp(mod, shapes) -> float:
    tree = abstract_tree(shapes)
    tx = mod.clippy(0.1, 1e-7)
    c = jax.jit(tx.update, donate_argnums=(0, 1)).lower(
        tree, jax.eval_shape(tx.init, tree), tree).compile()
    return temp_bytes(c) / tree_bytes(tree)


def main(paths: list[str]) -> None:
    mods = {"this": optclip}
    for i, path in enumerate(paths):
        spec = importlib.util.spec_from_file_location(f"clippy_other{i}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mods[path] = mod
    print("| tree | " + " | ".join(mods) + " |")
    print("|---" * (len(mods) + 1) + "|")
    for name, shapes in TREES.items():
        print(f"| {name} | " + " | ".join(f"{temp(m, shapes):.2f}x" for m in mods.values())
              + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
