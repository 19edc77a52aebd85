"""Where an update's trace goes on many leaves: cProfile of ``jit(update).lower`` on one tree
(after a warm-up trace on a tiny tree), restricted to optclip's functions.

    PYTHONPATH=. python bench/results/cpu_compile_floors/trace_profile.py agc many1000
"""

import cProfile
import pstats
import sys
import time

import jax

from bench import clippers, trees

name = sys.argv[1]
tree = sys.argv[2] if len(sys.argv) > 2 else "many1000"
p = trees.abstract_tree(trees.TREES[tree]())
tx = clippers.entries()[name].alone()
st = jax.eval_shape(tx.init, p)
tiny = trees.abstract_tree(trees.TREES["tiny_many"]())
jax.jit(lambda u, s, q: tx.update(u, s, q)).lower(tiny, jax.eval_shape(tx.init, tiny), tiny)
f = jax.jit(lambda u, s, q: tx.update(u, s, q), donate_argnums=(0, 1))
t0 = time.perf_counter()
prof = cProfile.Profile()
prof.enable()
f.lower(p, st, p)
prof.disable()
print(f"{name} on {tree}: trace + lower {time.perf_counter() - t0:.2f} s (under cProfile)")
pstats.Stats(prof).sort_stats("cumulative").print_stats(r"optclip", 16)
