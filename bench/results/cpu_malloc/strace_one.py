"""One jitted call with a 128 MB temporary (the masked min of page_faults.py), three times,
between two markers written to stderr, for ``strace``:

    strace -f -e trace=mmap,munmap,write -o /tmp/trace \
        python bench/results/cpu_malloc/strace_one.py
    awk '/MARK start/{on=1} on' /tmp/trace | grep -E "mmap|munmap"
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

x = jnp.asarray(np.random.default_rng(0).standard_normal((32 * 1024 * 1024,), np.float32))
w = x * 0.5 + 1
nz = lambda x: x != 0  # noqa: E731
f = jax.jit(lambda x, w: jnp.min(jnp.where(
    nz(x), (0.1 * jnp.abs(w) + 1e-7) / jnp.where(nz(x), jnp.abs(x), 1.0), jnp.inf)))
jax.block_until_ready(f(x, w))
os.write(2, b"MARK start\n")
for _ in range(3):
    jax.block_until_ready(f(x, w))
os.write(2, b"MARK end\n")
