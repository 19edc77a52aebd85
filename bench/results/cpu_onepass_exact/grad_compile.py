"""The compile time of ``jax.jit(jax.grad(loss))`` through a clipper's update on N leaves of
shape (8, 16), float32 (helper-43's review script, as it ran):

    PYTHONPATH=CHECKOUT python bench/results/cpu_onepass_exact/grad_compile.py N gn|leaf|agc

``CHECKOUT`` a worktree of 7238cac (the norms' exact-derivative custom_jvp, reverted) or of
36d30b7 (before it). helper-43's figures, clip_by_global_norm, 36d30b7 and 7238cac: N = 50
1.1 s and 5.2 s, 100 2.3 s and 21.8 s, 200 5.3 s and 183.5 s, 500 13.2 s and over 600 s;
N = 500, clip_by_leaf_norm 14.3 s and 37.0 s, agc 15.4 s and 31.4 s (a shared machine).
"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import optclip as oc

n, which = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
G = [jnp.asarray(rng.normal(size=(8, 16)), jnp.float32) for _ in range(n)]
tx = {"gn": oc.clip_by_global_norm(1.0), "leaf": oc.clip_by_leaf_norm(1.0),
      "agc": oc.agc(0.01)}[which]
st = tx.init(G)


def loss(g):
    return sum(jnp.sum(jnp.sin(v)) for v in tx.update(g, st, G)[0])


f = jax.jit(jax.grad(loss))
t = time.time()
c = f.lower(G).compile()
t1 = time.time() - t
t = time.time()
jax.block_until_ready(c(G))
print(which, n, "grad", f"compile {t1:.1f}s run {(time.time() - t) * 1e3:.1f}ms")
