"""Where ``jax.grad`` and ``jax.jvp`` of ``optclip.global_norm`` (float32, L2) stop matching
the float64 formula ``x / ||x||``: vectors of N elements ``linspace(1, 2, N) * 10**e``.

    PYTHONPATH=. python bench/results/derivative_edges/scan.py

Prints, per N, the exponents e where the gradient (g) or the tangent of ones (j) is off by
more than 1e-4 relative. README's Limits quotes it.
"""
import jax
import jax.numpy as jnp
import numpy as np

import optclip

gf = jax.jit(jax.grad(optclip.global_norm))
jf = jax.jit(lambda v, t: jax.jvp(optclip.global_norm, (v,), (t,))[1])
for n in (10, 10_000, 1_000_000):
    bad = []
    for e in range(-37, 39):
        x = jnp.asarray(np.linspace(1, 2, n) * 10.0 ** e, jnp.float32)
        a = np.asarray(x, np.float64)
        want = a / np.sqrt(np.sum(a * a))
        okg = np.allclose(np.asarray(gf(x)), want, rtol=1e-4)
        okj = np.isclose(float(jf(x, jnp.ones_like(x))), want.sum(), rtol=1e-4)
        if not (okg and okj):
            bad.append(f"1e{e}:{'' if okg else 'g'}{'' if okj else 'j'}")
    print(f"N = {n:>9,}: off at", " ".join(bad) or "none")
