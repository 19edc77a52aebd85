"""A clip of Adam's update ``u = -lr * d`` by ``min(1, min ratio)`` (Clippy's ratios,
``bench.clippers.fused_clippy``) that also takes the update's sum of squares (Clippy's norm
stat), on one float32 array of 2**25 elements (128 MB), on XLA:CPU: step time (median of 9),
bytes moved and temp in units of that array (``bench.traffic``), and the sum's relative error
against float64 NumPy.

* ``two``: a min and a sum, two reductions, as ``optclip.clippy`` takes them;
* ``one_pass``: one variadic ``lax.reduce`` giving both;
* ``rows<W>``: the same over rows of W elements (the array reshaped), then a min and a sum of
  the rows' results;
* ``rows<W>_scaled``: rows as above, the sum taken overflow-safe in the same pass (each row
  carries its largest magnitude and its sum of squares scaled by it, LAPACK's ``nrm2``
  update), then the rows combined by the same rule.

    PYTHONPATH=. python bench/results/cpu_traffic/one_pass.py
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bench import traffic

N = 1 << 25
d_np = np.random.default_rng(0).normal(size=N).astype(np.float32)
d = jnp.asarray(d_np)
p = jnp.asarray(np.random.default_rng(1).normal(size=N).astype(np.float32))
REF = float(np.sum((d_np * np.float32(-0.001)).astype(np.float64) ** 2))
INF, ZERO = jnp.float32(jnp.inf), jnp.float32(0)


def ratios(u, w):
    a = jnp.abs(u)
    return jnp.where(a > 0, (0.1 * jnp.abs(w) + 1e-7) / jnp.where(a > 0, a, 1.0), jnp.inf)


def two(d, p):
    u = d * -0.001
    return p + u * jnp.minimum(1, jnp.min(ratios(u, p))), jnp.sum(u * u)


def min_sum(a, b):
    return jnp.minimum(a[0], b[0]), a[1] + b[1]


def one_pass(d, p):
    u = d * -0.001
    m, s = lax.reduce((ratios(u, p), u * u), (INF, ZERO), min_sum, (0,))
    return p + u * jnp.minimum(1, m), s


def rows(width):
    def f(d, p):
        u = d * -0.001
        m, s = lax.reduce((ratios(u, p).reshape(-1, width), (u * u).reshape(-1, width)),
                          (INF, ZERO), min_sum, (1,))
        return p + u * jnp.minimum(1, jnp.min(m)), jnp.sum(s)
    return f


def scaled(a, b):
    """(min, scale, ssq): the min, and sum x**2 = scale**2 * ssq with scale the largest |x|."""
    sc = jnp.maximum(a[1], b[1])
    safe = jnp.where(sc > 0, sc, 1)
    return (jnp.minimum(a[0], b[0]), sc,
            a[2] * jnp.square(a[1] / safe) + b[2] * jnp.square(b[1] / safe))


def rows_scaled(width):
    def f(d, p):
        u = d * -0.001
        a = jnp.abs(u)
        parts = (ratios(u, p).reshape(-1, width), a.reshape(-1, width),
                 jnp.where(a > 0, 1.0, 0.0).astype(jnp.float32).reshape(-1, width))
        r = lax.reduce(parts, (INF, ZERO, ZERO), scaled, (1,))
        m, sc, q = lax.reduce(r, (INF, ZERO, ZERO), scaled, (0,))
        return p + u * jnp.minimum(1, m), jnp.square(sc) * q
    return f


for name, f in [("two", two), ("one_pass", one_pass), ("rows1024", rows(1024)),
                ("rows128", rows(128)), ("rows1024_scaled", rows_scaled(1024))]:
    j = jax.jit(f)
    c = j.lower(d, p).compile()
    out = jax.block_until_ready(j(d, p))
    ts = []
    for _ in range(9):
        t = time.perf_counter()
        jax.block_until_ready(j(d, p))
        ts.append(time.perf_counter() - t)
    print(f"{name:16s} {np.median(ts) * 1e3:7.1f} ms  moves "
          f"{traffic.step_cost(c).ordinary() / N / 4:.2f}  temp "
          f"{c.memory_analysis().temp_size_in_bytes / N / 4:.2f}  sum's relative error "
          f"{abs(float(out[1]) - REF) / REF:.1e}", flush=True)
