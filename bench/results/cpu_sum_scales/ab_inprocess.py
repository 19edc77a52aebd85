"""XLA's compile time of each chain + adam with the norms' rescue as shipped and as 391d8cc
took it (one pass), side by side in one process, many rounds interleaved.

391d8cc's ``optclip/norms.py`` (``git show 391d8cc:optclip/norms.py > FILE``) is loaded as a
module of its own, and its ``norm_core`` swapped in for the shipped one while a chain is
traced (every caller looks ``norm_core`` up in ``optclip.norms`` at trace time, and the
rest of that file is the shipped code). Each round traces, lowers and compiles every chain
in both forms, in a shuffled order; the lowering is timed apart from XLA's compile.

    PYTHONPATH=. python bench/results/cpu_sum_scales/ab_inprocess.py FILE resnet50 \\
        clip_by_leaf_norm,agc 12
"""
import importlib.util
import random
import statistics
import sys
import time

import jax

from bench.clippers import entries
from bench.run import train_step
from bench.trees import TREES, abstract_tree
from optclip import norms

spec = importlib.util.spec_from_file_location("norms_onepass", sys.argv[1])
onepass = importlib.util.module_from_spec(spec)
spec.loader.exec_module(onepass)
forms = {"shipped": norms.norm_core, "one pass": onepass.norm_core}

reg = entries()
tree = abstract_tree(TREES[sys.argv[2]]())
names, reps = sys.argv[3].split(","), int(sys.argv[4])
tiny = abstract_tree(TREES["tiny"]())
warm = reg["adam"].chain()
train_step(warm).lower(tiny, jax.eval_shape(warm.init, tiny), tiny).compile()
got: dict = {}
rng = random.Random(0)
for r in range(reps):
    tasks = [(n, f) for n in names for f in forms]
    rng.shuffle(tasks)
    for name, form in tasks:
        norms.norm_core = forms[form]
        try:
            tx = reg[name].chain()
            t0 = time.perf_counter()
            lowered = train_step(tx).lower(tree, jax.eval_shape(tx.init, tree), tree)
            t1 = time.perf_counter()
            lowered.compile()
            t2 = time.perf_counter()
        finally:
            norms.norm_core = forms["shipped"]
        got.setdefault((name, form), []).append((t1 - t0, t2 - t1))
        print(f"round {r + 1}: {name} {form}: lower {t1 - t0:.2f} s, compile {t2 - t1:.2f} s",
              flush=True)
print(f"\n{sys.argv[2]}, medians of {reps} rounds in one process (XLA's compile; trace + lower)")
for (name, form), xs in sorted(got.items()):
    c = [x[1] for x in xs]
    q = statistics.quantiles(c, n=4)
    print(f"{name:20s} {form:9s} compile {statistics.median(c):.2f} s (quartiles {q[0]:.2f}, "
          f"{q[2]:.2f}); trace + lower {statistics.median(x[0] for x in xs):.2f} s")
