"""What the glibc tunables of README.md here cost: 40 calls of one jitted function with a
128 MB block (``select``: the masked min of page_faults.py, a 128 MB temporary; ``copy``:
``x * 2``, a 128 MB output dropped after each call), each call's time, minor page faults,
growth of the heap's top (``sbrk(0)``, from after the first call) and resident memory.

    PYTHONPATH=. python bench/results/cpu_malloc/heap_growth.py select
    GLIBC_TUNABLES=... PYTHONPATH=. python bench/results/cpu_malloc/heap_growth.py copy
"""

import ctypes
import os
import resource
import sys
import time

import jax
from block import arrays, masked_min

libc = ctypes.CDLL("libc.so.6")
libc.sbrk.restype = ctypes.c_void_p
x, w = arrays()
kind = sys.argv[1]
f = jax.jit(masked_min if kind == "select" else (lambda x, w: x * 2))
jax.block_until_ready(f(x, w))
top0 = libc.sbrk(0)


def resident_mb() -> int:
    with open("/proc/self/statm") as fh:
        return round(int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20)


calls = []
for _ in range(40):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    out = f(x, w)
    jax.block_until_ready(out)
    ms = (time.perf_counter() - t) * 1e3
    del out
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    calls.append((ms, faults, (libc.sbrk(0) - top0) >> 20, resident_mb()))
print(f"{kind}, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}")
print("calls: ms / minor faults / heap top grown (MB) / resident (MB)")
print(" ".join(f"{ms:.0f}/{fl}/{hb}/{rs}" for ms, fl, hb, rs in calls))
grew = [i + 1 for i, c in enumerate(calls) if c[1] > 10000]
print(f"calls with more than 10,000 faults: {len(grew)} ({grew}); median ms "
      f"{sorted(c[0] for c in calls)[len(calls) // 2]:.0f}; heap top grown at the end "
      f"{calls[-1][2]} MB; resident at the end {calls[-1][3]} MB")
