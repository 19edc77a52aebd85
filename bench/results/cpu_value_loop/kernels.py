"""Where `clip_by_value`'s GPT-2 chain + adam spends its kernels: the fused computations of
its compiled step as it is, with the non-finite step's clamp flag
(``static._chunked_any``) taking its first step outside the loop as it did before 004e030,
and with that flag replaced by a constant (not a correct clipper: for the count only),
beside the global-norm chain. Kernel counts do not vary from run to run; the compile times
printed beside them are one sample each, in one process.

    PYTHONPATH=. python bench/results/cpu_value_loop/kernels.py
"""

import importlib
import time

import jax
import jax.numpy as jnp
import optax
from jax import lax

import optclip
from bench import trees
from bench.compile_probe import fused_counts
from bench.run import train_step

S = importlib.import_module("optclip.static")
SHIPPED = S._chunked_any


def first_step_outside(vals, pred, chunks=S._ANY_CHUNKS):
    """``static._chunked_any`` as it was before 004e030."""
    dtype = jnp.result_type(*vals) if vals else jnp.float32
    huge = [jnp.any(pred(v)) for v in vals if v.size >= S._INT32_MAX]
    flat = [v.ravel().astype(dtype) for v in vals if 0 < v.size < S._INT32_MAX]
    init = jnp.any(jnp.stack(huge)) if huge else jnp.zeros((), bool)
    if not flat:
        return init
    widths = [-(-v.size // chunks) for v in flat]

    def step(i, acc):
        parts = [lax.dynamic_slice(v, (jnp.minimum(i * w, v.size - w),), (w,))
                 for v, w in zip(flat, widths, strict=True)]
        return acc | jnp.any(pred(jnp.concatenate(parts) if len(parts) > 1 else parts[0]))

    return lax.fori_loop(1, chunks, step, step(0, init))


def main() -> None:
    p = trees.abstract_tree(trees.TREES["gpt2"]())
    tiny = trees.abstract_tree(trees.TREES["tiny"]())  # a first compile pays one-off costs
    warm = optax.adam(1e-3)
    train_step(warm).lower(tiny, jax.eval_shape(warm.init, tiny), tiny).compile()
    forms = [("clip_by_value, as shipped", SHIPPED, optclip.clip_by_value),
             ("clip_by_value, the loop's first step outside it (before 004e030)",
              first_step_outside, optclip.clip_by_value),
             ("clip_by_value, no non-finite clamp flag (for the count only)",
              lambda vals, pred, chunks=256: jnp.zeros((), bool), optclip.clip_by_value),
             ("clip_by_global_norm", SHIPPED, optclip.clip_by_global_norm)]
    try:
        for name, loop, make in forms:
            S._chunked_any = loop
            chain = optax.chain(make(0.1), optax.adam(1e-3))
            t0 = time.perf_counter()
            hlo = train_step(chain).lower(p, jax.eval_shape(chain.init, p), p).compile().as_text()
            fused, distinct = fused_counts(hlo)
            print(f"{name}: {fused} fused kernels, {distinct} distinct; first call "
                  f"{time.perf_counter() - t0:.2f} s (one sample)", flush=True)
    finally:
        S._chunked_any = SHIPPED


if __name__ == "__main__":
    main()
