"""What a fresh buffer costs a jitted call on XLA:CPU: the median call and the minor page
faults per call, on one float32 array of 128 MB.

    PYTHONPATH=. python bench/results/cpu_malloc/page_faults.py

- ``sum``: a reduction, nothing written.
- ``copy x*2``: an output of 128 MB (not donated: a fresh buffer every call).
- ``min b/|u|``: arithmetic only in the min's operand, which XLA:CPU fuses into it.
- ``min select``: the same with a select, which XLA:CPU writes out first: a temporary of
  128 MB (``python -m bench.xla_probe reduce_fusion``).

XLA:CPU allocates its temporaries (and outputs) at every call and frees them after it;
glibc serves a block that large with ``mmap`` and returns it with ``munmap``, so the
kernel maps fresh zeroed pages, one fault per 4 KB page, at every call. Run it again with
``GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:``
``glibc.malloc.trim_threshold=1099511627776`` to see the faults go (README.md here).
"""

import resource
import time

import jax
import jax.numpy as jnp
from block import arrays, bound, masked_min

x, w = arrays()


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def bench(name: str, f, *args, reps: int = 9) -> None:
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    ts = []
    f0 = faults()
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    per_call = (faults() - f0) / reps
    print(f"{name:12s} {sorted(ts)[reps // 2] * 1e3:6.1f} ms  minor faults/call "
          f"{per_call:7.0f} ({per_call * 4 / 1024:4.0f} MB of 4 KB pages)", flush=True)


bench("sum", lambda x: jnp.sum(x), x)
bench("copy x*2", lambda x: x * 2, x)
bench("min b/|u|", lambda x, w: jnp.min(bound(w) / jnp.abs(x)), x, w)
bench("min select", masked_min, x, w)
