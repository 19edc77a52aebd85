"""Compile time on XLA:CPU of 30 reductions of distinct shapes in one jitted function, by kind
and size, each kind in a fresh process:

    PYTHONPATH=. python bench/results/cpu_clippy_first_call/reduction_compile.py

``plain N``: a sum of squares over each of 30 vectors of N + 8 i elements; ``variadic N``:
the min of ``0.1 / |x|`` and the sum of squares in one ``lax.reduce``, over the same vectors.
Prints the seconds of ``.compile()`` and how many of the compiled fusions XLA made YNNPACK
fusions (``__ynn_fusion``) or reduce-window trees.
"""
import subprocess
import sys

CODE = r'''
import re, sys, time
import jax, jax.numpy as jnp
from jax import lax
kind, n = sys.argv[1], int(sys.argv[2])
xs = [jax.ShapeDtypeStruct((n + 8 * i,), jnp.float32) for i in range(30)]
def f(xs):
    if kind == "plain":
        return [jnp.sum(x * x) for x in xs]
    return [lax.reduce((0.1 / jnp.abs(x), x * x), (jnp.float32(jnp.inf), jnp.float32(0)),
                       lambda a, b: (jnp.minimum(a[0], b[0]), a[1] + b[1]), (0,)) for x in xs]
jax.jit(lambda x: x + 1).lower(jnp.ones(3)).compile()
lo = jax.jit(f).lower(xs)
t = time.perf_counter(); c = lo.compile(); s = time.perf_counter() - t
txt = c.as_text()
print(f"{kind:8s} {n:7d} elements: compile {s:.3f} s, ynn fusions "
      f"{len(re.findall(r'__ynn_fusion', txt))}, reduce-windows {txt.count('reduce-window(')}")
'''
for kind in ("plain", "variadic"):
    for n in (64, 512, 2048, 8192, 32768, 131072):
        subprocess.run([sys.executable, "-c", CODE, kind, str(n)], check=True)
