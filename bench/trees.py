"""The benchmark's gradient trees, by shape only (values are random)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gpt2_small_shapes() -> dict[str, tuple[int, ...]]:
    """GPT-2 small: 124M parameters in 148 leaves (12 layers, d=768, vocab 50257)."""
    d, v, ctx, layers = 768, 50257, 1024, 12
    shapes = {"wte": (v, d), "wpe": (ctx, d), "ln_f.g": (d,), "ln_f.b": (d,)}
    for i in range(layers):
        p = f"h{i}."
        shapes |= {p + "ln_1.g": (d,), p + "ln_1.b": (d,), p + "attn.c_attn.w": (d, 3 * d),
                   p + "attn.c_attn.b": (3 * d,), p + "attn.c_proj.w": (d, d),
                   p + "attn.c_proj.b": (d,), p + "ln_2.g": (d,), p + "ln_2.b": (d,),
                   p + "mlp.c_fc.w": (d, 4 * d), p + "mlp.c_fc.b": (4 * d,),
                   p + "mlp.c_proj.w": (4 * d, d), p + "mlp.c_proj.b": (d,)}
    return shapes


def resnet50_shapes() -> dict[str, tuple[int, ...]]:
    """ResNet-50: about 25.6M parameters in 161 leaves (conv kernels, batch-norm scales/biases)."""
    shapes = {"stem.conv": (7, 7, 3, 64), "stem.bn.s": (64,), "stem.bn.b": (64,)}
    cin = 64
    for si, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        for b in range(blocks):
            p = f"s{si}b{b}."
            cout = width * 4
            for j, (k, ci, co) in enumerate(((1, cin, width), (3, width, width),
                                             (1, width, cout))):
                shapes |= {p + f"conv{j}": (k, k, ci, co), p + f"bn{j}.s": (co,),
                           p + f"bn{j}.b": (co,)}
            if b == 0:
                shapes |= {p + "proj": (1, 1, cin, cout), p + "proj.bn.s": (cout,),
                           p + "proj.bn.b": (cout,)}
            cin = cout
    shapes |= {"fc.w": (2048, 1000), "fc.b": (1000,)}
    return shapes


def small_leaves_shapes(n: int, shape: tuple[int, ...] = (32,)) -> dict[str, tuple[int, ...]]:
    """n small leaves (the many-leaves case: MoE experts, un-scanned deep models)."""
    return {f"l{i:05d}": shape for i in range(n)}


# The shapes of a small layer's parameters, cycled through by the mixed many-leaves trees:
# vectors (biases, norm scales), matrices, conv kernels, a scalar (a learned temperature).
MIXED_SHAPES: tuple[tuple[int, ...], ...] = (
    (32,), (16, 8), (3, 3, 4, 8), (64,), (8, 4, 2), (5,), (24, 24), (1, 1, 16, 8),
    (), (128,), (2, 50), (4, 4, 4, 4),
)


def mixed_leaves_shapes(n: int) -> dict[str, tuple[int, ...]]:
    """n small leaves of mixed shapes (at most 576 elements each), named ``b0012/p3``."""
    return {f"b{i // len(MIXED_SHAPES):04d}/p{i % len(MIXED_SHAPES):02d}":
            MIXED_SHAPES[i % len(MIXED_SHAPES)] for i in range(n)}


TREES = {
    "gpt2": gpt2_small_shapes,
    "resnet50": resnet50_shapes,
    "leaves1000": lambda: small_leaves_shapes(1000),
    "leaves2000": lambda: small_leaves_shapes(2000),
    "leaves4000": lambda: small_leaves_shapes(4000),
    "leaves10000": lambda: small_leaves_shapes(10000),
    # the many-leaves trees of mixed small shapes (``--many-trees``)
    "many1000": lambda: mixed_leaves_shapes(1000),
    "many2000": lambda: mixed_leaves_shapes(2000),
    "many5000": lambda: mixed_leaves_shapes(5000),
    # --quick: tiny stand-ins, so that the harness runs in seconds in the test suite
    "tiny": lambda: {"w": (64, 32), "b": (32,), "v": (128,)},
    # --quick's step tree (and the temp-buffer tests'): 4.6 MB, so that a fixed-size buffer of
    # a few KB is not 5% of it, while a temporary the size of a leaf is. Two large matrices
    # (as GPT-2's) and, as in ResNet-50, conv kernels and norm scales under 65,536 elements,
    # 8% of the bytes (ResNet-50: about 25%).
    "small": lambda: {"w1": (1024, 512), "b1": (512,), "conv1": (3, 3, 64, 64),
                      "conv2": (3, 3, 64, 64), "proj": (1, 1, 256, 64), "bn.s": (64,),
                      "bn.b": (64,), "w2": (512, 1024), "b2": (1024,)},
    "tiny_leaves": lambda: small_leaves_shapes(50, (4,)),
    "tiny_many": lambda: mixed_leaves_shapes(12),
}

STEP_TREES = ("gpt2", "resnet50")
MANY_TREES = ("many1000", "many2000", "many5000")


def _nest(flat: dict[str, object]) -> dict:
    """``{"a/b": x}`` -> ``{"a": {"b": x}}`` (the mixed trees are nested, as real models are)."""
    out: dict = {}
    for k, v in flat.items():
        *parents, leaf = k.split("/")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = v
    return out


def make_tree(shapes: dict[str, tuple[int, ...]], seed: int = 0, scale: float = 0.01):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return _nest({k: jax.random.normal(key, s, jnp.float32) * scale
                  for key, (k, s) in zip(keys, shapes.items(), strict=True)})


def abstract_tree(shapes: dict[str, tuple[int, ...]], dtype=jnp.float32):
    """The same tree as ``make_tree``, as ``jax.ShapeDtypeStruct`` leaves (to compile only)."""
    return _nest({k: jax.ShapeDtypeStruct(s, dtype) for k, s in shapes.items()})


def tree_bytes(tree) -> int:
    """Bytes of the array (or ShapeDtypeStruct) leaves of a pytree."""
    total = 0
    for x in jax.tree.leaves(tree):
        n = 1
        for d in x.shape:
            n *= d
        total += n * jnp.dtype(x.dtype).itemsize
    return total


def n_params(shapes: dict[str, tuple[int, ...]]) -> int:
    total = 0
    for s in shapes.values():
        n = 1
        for d in s:
            n *= d
        total += n
    return total
