"""clippy's first call on ResNet-50 with one of two changes, a diagnostic (not overflow-safe
or not correct: neither ships). Prints ``R VARIANT lower_s first_call_s (fused, distinct)``.

    for r in 1 2 3; do for v in base nogather; do
        PYTHONPATH=. python bench/results/cpu_clippy_onepass/first_call/ablate.py $v; done; done

* ``nogather``: every leaf takes the first element of its factors' vector, with no gather
  (``norms.split_flat`` replaced; the factors are wrong): what the per-leaf gathers cost.
* ``restvar``: each large tensor's rows' results reduced by one variadic reduction (the min
  and three sums together) instead of four plain ones: fewer kernels.
"""
import sys
import time

import jax

import optclip.clippy  # noqa: F401  (the module: ``optclip.clippy`` is the function)
from bench.clippers import entries
from bench.compile_probe import fused_counts
from bench.run import train_step
from bench.trees import TREES, abstract_tree
from optclip import norms as _n

C = sys.modules["optclip.clippy"]
v = sys.argv[1]
if v == "nogather":
    _n.split_flat = lambda flat, lay: [flat[0]] * len(lay.shapes)
elif v == "restvar":
    src = open(C.__file__).read()
    old = "m, sums = jnp.min(m, axis=rest), [jnp.sum(t, axis=rest) for t in sums]"
    assert old in src
    src = src.replace(old, "m, *sums = _variadic((m, *sums), tuple(rest))")
    exec(compile(src, C.__file__, "exec"), C.__dict__)
reg = entries()
tiny = abstract_tree(TREES["tiny"]())
warm = reg["adam"].chain()
train_step(warm).lower(tiny, jax.eval_shape(warm.init, tiny), tiny).compile()
tree = abstract_tree(TREES["resnet50"]())
tx = reg["clippy"].chain()
state = jax.eval_shape(tx.init, tree)
t0 = time.perf_counter()
lowered = train_step(tx).lower(tree, state, tree)
t1 = time.perf_counter()
compiled = lowered.compile()
t2 = time.perf_counter()
print("R", v, f"{t1 - t0:.2f} {t2 - t0:.2f}", fused_counts(compiled.as_text()))
