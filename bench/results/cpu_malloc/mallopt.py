"""The three settings of the GLIBC_TUNABLES of README.md here, made from inside the
process by glibc's ``mallopt`` (the trim threshold at 2**31 - 1 bytes, the largest its
``int`` takes, where the tunable has 2**40), either before JAX is imported (``before``)
or after (``after``); then 10 calls of page_faults.py's masked min (a 128 MB temporary),
each one's minor page faults.

    PYTHONPATH=. python bench/results/cpu_malloc/mallopt.py before
"""

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's malloc.h


def settings() -> None:
    libc = ctypes.CDLL("libc.so.6")
    for key, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1)):
        assert libc.mallopt(key, ctypes.c_int(value)) == 1


when = sys.argv[1]
if when == "before":
    settings()

import jax  # noqa: E402
from block import arrays, faults_per_call, masked_min  # noqa: E402

if when == "after":
    settings()
x, w = arrays()
f = jax.jit(masked_min)
jax.block_until_ready(f(x, w))
print(f"mallopt {when} importing jax: minor faults per call {faults_per_call(f, x, w)}")
