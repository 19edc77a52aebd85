"""Outputs, stats and gradients of the per-unit clippers and ``clippy``, pickled; with two
pickles, compared byte for byte:

    python bench/results/cpu_split_trace/same_outputs.py CHECKOUT OUT.pkl
    python bench/results/cpu_clippy_trace/same_outputs.py --compare A.pkl B.pkl

A tree of small, large, scalar, zero-size and bfloat16 leaves holding a NaN and an inf;
each clipper's update eager and jitted, and the gradient of the clipped updates' sum of
squares with respect to the (finite) updates.
"""

import pickle
import sys
from pathlib import Path

CHECKOUT = str(Path(sys.argv[1]).resolve())
sys.path.insert(0, CHECKOUT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import optclip  # noqa: E402

SHAPES = {"a": (3, 4, 5), "b": (7,), "c": (2, 3), "d": (200, 300), "e": (), "f": (0, 3),
          "h": (6, 3), "i": (6, 3), "j": (1, 5), "k": (5,), "l": (2, 2, 2)}


def tree(rng: np.random.Generator, scale: float) -> dict:
    t = {k: jnp.asarray(rng.standard_normal(s).astype(np.float32) * np.float32(scale))
         for k, s in SHAPES.items()}
    t["g"] = jnp.asarray(rng.standard_normal((4, 4)), jnp.bfloat16)
    t["b"] = t["b"].at[2].set(jnp.nan)
    t["h"] = t["h"].at[0, 0].set(jnp.inf)
    return t


def main() -> None:
    assert optclip.__file__.startswith(CHECKOUT), optclip.__file__
    rng = np.random.default_rng(1)
    u, p = tree(rng, 3.0), tree(rng, 1.0)
    finite = {k: jnp.nan_to_num(v.astype(jnp.float32), posinf=1.0) for k, v in u.items()}
    txs = {"agc": optclip.agc(0.01), "clippy": optclip.clippy(0.1, 1e-7),
           "clip_by_leaf_norm": optclip.clip_by_leaf_norm(1.0),
           "clip_by_block_rms": optclip.clip_by_block_rms(0.5), "adagc": optclip.adagc(),
           "clippy_abs0": optclip.clippy(0.1, 0.0)}
    out = {}
    for name, tx in txs.items():
        state = tx.init(p)
        for mode, f in (("eager", tx.update), ("jit", jax.jit(tx.update))):
            for i, leaf in enumerate(jax.tree.leaves(f(u, state, p))):
                out[f"{name}/{mode}/{i}"] = np.asarray(leaf)

        def loss(uu, tx=tx, state=state):
            clipped = tx.update(uu, state, p)[0]
            return sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(clipped))

        for i, leaf in enumerate(jax.tree.leaves(jax.grad(loss)(finite))):
            out[f"{name}/grad/{i}"] = np.asarray(leaf)
    with open(sys.argv[2], "wb") as fh:
        pickle.dump(out, fh)
    print(f"{len(out)} arrays written to {sys.argv[2]}")


if __name__ == "__main__":
    main()
