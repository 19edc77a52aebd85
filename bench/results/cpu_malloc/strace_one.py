"""One jitted call with a 128 MB temporary (the masked min of page_faults.py), three times,
between two markers written to stderr, for ``strace``:

    strace -f -e trace=mmap,munmap,write -o /tmp/trace \
        python bench/results/cpu_malloc/strace_one.py
    awk '/MARK start/{on=1} on' /tmp/trace | grep -E "mmap|munmap"
"""

import os

import jax
from block import arrays, masked_min

x, w = arrays()
f = jax.jit(masked_min)
jax.block_until_ready(f(x, w))
os.write(2, b"MARK start\n")
for _ in range(3):
    jax.block_until_ready(f(x, w))
os.write(2, b"MARK end\n")
