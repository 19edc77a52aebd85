"""One 8192 x 1024 float32 array (32 MiB), jitted, median of 30 interleaved calls: a plain
sum of squares; a sum of squares and a max (two reductions); a complex sum carrying the
clamped terms of a clip by value in its imaginary part; the element-wise clamp alone; Blue's
three scaled sums (``optclip.norms.blue_terms``) by three plain row sums, and by one
variadic reduction (per row of 2,048 elements):

    PYTHONPATH=. python bench/results/cpu_not_taken/reductions.py
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optclip import norms

x = jnp.asarray(np.random.default_rng(0).normal(size=(8192, 1024)).astype(np.float32))
c = 0.1


def plain(x):
    return jnp.sum(x * x)


def sum_and_max(x):
    return jnp.sum(x * x), jnp.max(jnp.abs(x))


def complex_sum(x):
    a = jnp.abs(x)
    m = jnp.minimum(a, c)
    s = jnp.sum(lax.complex(m * m, jnp.where(a > c, (a - c) * (a + c), 0.0)))
    return s.real, s.imag


def clamp(x):
    return jnp.clip(x, -c, c)


rows = x.reshape(4096, 2048)


def plain_rows(x):
    return jnp.sum(x * x, axis=1)


def blue_three_sums(x):
    a, b, d = norms.blue_terms(x, jnp.float32)
    return norms.blue_norm(a.sum(1), b.sum(1), d.sum(1))


def blue_variadic(x):
    z = jnp.zeros((), jnp.float32)
    s = lax.reduce(norms.blue_terms(x, jnp.float32), (z, z, z),
                   lambda a, b: tuple(p + q for p, q in zip(a, b, strict=True)), (1,))
    return norms.blue_norm(*s)


cases = [(f, x) for f in (plain, sum_and_max, complex_sum, clamp)] + \
    [(f, rows) for f in (plain_rows, blue_three_sums, blue_variadic)]
jitted = [(f.__name__, jax.jit(f), v) for f, v in cases]
for _, j, v in jitted:
    jax.block_until_ready(j(v))
times = {n: [] for n, _, _ in jitted}
for _ in range(30):
    for n, j, v in jitted:
        t = time.perf_counter()
        jax.block_until_ready(j(v))
        times[n].append(time.perf_counter() - t)
for n, _, _ in jitted:
    print(f"{n:16s} {np.median(times[n]) * 1e3:7.2f} ms")
