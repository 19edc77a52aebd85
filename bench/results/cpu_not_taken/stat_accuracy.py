"""clippy's norm stat (``grad_norm``) on one large tensor against float64:

    PYTHONPATH=CHECKOUT python bench/results/cpu_not_taken/stat_accuracy.py
"""
import jax
import jax.numpy as jnp
import numpy as np

import optclip

rng = np.random.default_rng(1)
for shape, scale in [((50257, 768), 1e-3), ((4096, 4096), 1.0), ((2**25,), 1.0)]:
    u = rng.normal(size=shape).astype(np.float32) * scale
    if scale == 1e-3:
        u = np.abs(u)  # one sign, as Adam's first steps
    w = {"a": jnp.ones(shape, jnp.float32)}
    tx = optclip.clippy(0.1, 1e-7)
    _, st = jax.jit(tx.update)({"a": jnp.asarray(u)}, tx.init(w), w)
    ref = np.sqrt(np.sum(u.astype(np.float64) ** 2))
    print(shape, scale, "relative error", abs(float(st.stats.grad_norm) - ref) / ref)
