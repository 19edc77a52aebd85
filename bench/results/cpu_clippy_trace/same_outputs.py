"""clippy's updates, state and gradient on a mixed tree (float32 tensors of 1 to 90,000
elements, a bfloat16 one, a NaN, a clipped tensor), pickled; with two pickles, compared
byte for byte:

    PYTHONPATH=CHECKOUT python bench/results/cpu_clippy_trace/same_outputs.py OUT.pkl
    python bench/results/cpu_clippy_trace/same_outputs.py --compare A.pkl B.pkl
"""
import pickle
import sys

import numpy as np

if sys.argv[1] == "--compare":
    a, b = (pickle.load(open(f, "rb")) for f in sys.argv[2:4])
    diffs = [k for k in a if a[k].shape != b[k].shape
             or a[k].tobytes() != b[k].tobytes()]
    print(f"{len(a)} arrays, {len(diffs)} differ", diffs)
    sys.exit(0)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import optclip  # noqa: E402

rng = np.random.default_rng(0)
shapes = [(300, 300), (70000,), (4, 5), (4, 5), (3,), (3,), (17,), (1,), (), (2, 3, 4),
          (128, 600)]


def make(scale):
    return {f"l{i}": jnp.asarray(rng.normal(size=s).astype(np.float32) * scale)
            for i, s in enumerate(shapes)}


u, w = make(1e-2), make(1.0)
u["l0"] = u["l0"].at[3, 4].set(jnp.nan)
u["l3"] = u["l3"].at[0, 0].set(5.0)
u["b"] = jnp.asarray(rng.normal(size=(8, 8)), jnp.bfloat16)
w["b"] = jnp.ones((8, 8), jnp.bfloat16)
tx = optclip.clippy(0.1, 1e-7)
out = {}
for name, uu in [("nan", u), ("finite", {k: jnp.nan_to_num(v) for k, v in u.items()})]:
    res = jax.jit(tx.update)(uu, tx.init(w), w)
    for path, x in jax.tree_util.tree_leaves_with_path(res):
        out[name + jax.tree_util.keystr(path)] = np.atleast_1d(np.asarray(x))
uf = {k: jnp.nan_to_num(v) for k, v in u.items() if v.dtype == jnp.float32}
wf = {k: w[k] for k in uf}
grad = jax.jit(jax.grad(lambda v: sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(
    tx.update(v, tx.init(wf), wf)[0]))))(uf)
for path, x in jax.tree_util.tree_leaves_with_path(grad):
    out["grad" + jax.tree_util.keystr(path)] = np.atleast_1d(np.asarray(x))
pickle.dump(out, open(sys.argv[1], "wb"))
print(f"{len(out)} arrays written to {sys.argv[1]}")
