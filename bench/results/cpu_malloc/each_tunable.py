"""Minor page faults per call of the masked min (block.py) on a 128 MB and on an 8 MB
array: run it with glibc's defaults, with each of README.md's three tunables alone, and
with all three (each_tunable.sh does all five).

    GLIBC_TUNABLES=glibc.malloc.mmap_max=0 PYTHONPATH=. \
        python bench/results/cpu_malloc/each_tunable.py
"""

import os

import jax
from block import arrays, faults_per_call, masked_min

x, w = arrays()
f = jax.jit(masked_min)
print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}")
for n, label in ((x.size, "128 MB"), (x.size // 16, "8 MB")):
    a, b = x[:n], w[:n]
    jax.block_until_ready(f(a, b))
    print(f"  {label}: minor faults per call {faults_per_call(f, a, b)}")
