"""Where `clip_by_value`'s GPT-2 chain + adam spends its kernels: the fused computations of
its compiled step as it is, and with the non-finite step's clamp flag
(``static._chunked_any``) replaced by a constant (not a correct clipper: for the count
only), beside the global-norm chain. (Before 004e030, whose loop compiled its first step
apart from its body: 839 fused, 100 distinct, in ``compile_probe.log``'s "against" rows.)
Kernel counts do not vary from run to run; the compile times printed beside them are one
sample each, in one process.

    PYTHONPATH=. python bench/results/cpu_value_loop/kernels.py
"""

import importlib
import time

import jax
import jax.numpy as jnp
import optax

import optclip
from bench import trees
from bench.compile_probe import fused_counts
from bench.run import train_step

S = importlib.import_module("optclip.static")
SHIPPED = S._chunked_any


def main() -> None:
    p = trees.abstract_tree(trees.TREES["gpt2"]())
    tiny = trees.abstract_tree(trees.TREES["tiny"]())  # a first compile pays one-off costs
    warm = optax.adam(1e-3)
    train_step(warm).lower(tiny, jax.eval_shape(warm.init, tiny), tiny).compile()
    forms = [("clip_by_value, as shipped", SHIPPED, optclip.clip_by_value),
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
