"""How long a row one variadic reduction may sum, on XLA:CPU (``optclip.clippy._ROW``).

One float32 array of 2**25 elements, reduced as rows of W elements by one variadic
``lax.reduce`` giving a min and a sum of squares (both used, as ``clippy`` uses both), then a
plain min and sum over the rows. Prints the sum's relative error against float64 NumPy, beside
a plain ``jnp.sum`` of the squares, for normal floats and for floats of one magnitude
(+-1e-3, as Adam's first steps are: rounding errors that do not cancel). XLA:CPU emits the
variadic reduction as a loop that adds each element to a running float32 sum in turn, so its
error grows with W.

    PYTHONPATH=. python bench/results/cpu_clippy_onepass/row_width.py
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

N = 1 << 25
rng = np.random.default_rng(0)
INPUTS = {"normal": rng.normal(size=N).astype(np.float32),
          "+-1e-3": (rng.choice([-1.0, 1.0], size=N) * 1e-3).astype(np.float32)}


def rows(width):
    def f(v):
        a = v.reshape(-1, width)
        m, s = lax.reduce((jnp.abs(a), a * a), (jnp.float32(jnp.inf), jnp.float32(0)),
                          lambda p, q: (jnp.minimum(p[0], q[0]), p[1] + q[1]), (1,))
        return jnp.min(m), jnp.sum(s)
    return f


for label, x_np in INPUTS.items():
    x = jnp.asarray(x_np)
    ref = float(np.sum(x_np.astype(np.float64) ** 2))
    plain = float(jax.jit(lambda v: jnp.sum(v * v))(x))
    print(f"{label:7s} plain jnp.sum          relative error {abs(plain - ref) / ref:.1e}")
    for width in (1 << 8, 1 << 10, 1 << 12, 1 << 14, 1 << 16, N):
        got = float(jax.jit(rows(width))(x)[1])
        print(f"{label:7s} rows of {width:>9,d}     relative error {abs(got - ref) / ref:.1e}",
              flush=True)
