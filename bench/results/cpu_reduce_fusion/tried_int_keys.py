"""Tried, not kept: clippy's minimum ratio as a minimum of integer keys, against it as it is.

The ratios' bits as int32 (a non-negative float's bits order as the float does), -1 where the
bound is NaN and +inf's bits where the update is 0 or not finite, built by arithmetic on
compares converted to integers rather than by selects; the minimum of the keys is decoded
back into the ratio. The aim was an operand that XLA:CPU fuses into the min, so that the
ratios are not written out. It holds more, not less (``tried_int_keys.log`` beside this file):
a compare, a conversion and a bitcast are not fused either (``python -m bench.xla_probe
reduce_fusion``). Patches ``optclip.clippy``'s ``_ratios`` and ``_sigma`` in this process.

    PYTHONPATH=. python bench/results/cpu_reduce_fusion/tried_int_keys.py
"""

import importlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import optclip
from bench import trees
from bench.run import temp_bytes, train_step
from optclip._common import mul0

C = importlib.import_module("optclip.clippy")  # the module (optclip.clippy is the function)
ORIG = C._ratios, C._sigma


def key_ratios(u, w, lam_rel, lam_abs, acc):
    d = jnp.abs(u).astype(acc)
    bound = mul0(jnp.abs(w).astype(acc), lam_rel.astype(acc)) + lam_abs.astype(acc)
    bits = lax.bitcast_convert_type(bound / d, jnp.int32)
    nan = (bound / d != bound / d).astype(jnp.int32)
    active = ((d > 0) & (d < jnp.inf)).astype(jnp.int32)
    inf_bits = int(np.asarray(np.inf, np.float32).view(np.int32))
    return active * (bits * (1 - nan) - nan) + (1 - active) * inf_bits


def key_sigma(k):
    r = lax.bitcast_convert_type(jnp.maximum(k, 0), jnp.float32)
    return ORIG[1](jnp.where(k < 0, -jnp.ones((), jnp.float32), r))


def main() -> None:
    for name in ("two leaves", "gpt2", "resnet50", "many1000"):
        if name == "two leaves":
            p = {"a": jax.ShapeDtypeStruct((512, 1024), jnp.float32),
                 "b": jax.ShapeDtypeStruct((1024, 512), jnp.float32)}
        else:
            p = trees.abstract_tree(trees.TREES[name]())
        size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(p))
        for form in ("as it is", "int keys"):
            C._ratios, C._sigma = ORIG if form == "as it is" else (key_ratios, key_sigma)
            chain = optax.chain(optax.adam(1e-3), optclip.clippy(0.1, 1e-7))
            t0 = time.perf_counter()
            c = train_step(chain).lower(p, jax.eval_shape(chain.init, p), p).compile()
            print(f"{name}, adam + clippy, min ratio {form}: temp {temp_bytes(c) / size:.3f}x "
                  f"the tree, first call {time.perf_counter() - t0:.2f} s", flush=True)
    C._ratios, C._sigma = ORIG


if __name__ == "__main__":
    main()
