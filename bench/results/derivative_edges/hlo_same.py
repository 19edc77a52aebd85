"""Hashes of each clipper's compiled update (XLA:CPU), with metadata, stack frames and
instruction numbers stripped, so that two checkouts' programs can be compared:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=CHECKOUT \\
        python bench/results/derivative_edges/hlo_same.py

for a ``git worktree`` of each commit; the same lines mean the same programs (the last one a
``shard_map`` of an L2, a per-leaf and an L-inf norm on 8 simulated devices). At 36d30b7 and
at ba6ad82 (``pmax``'s derivative, ``norm_across``'s ``stop_gradient``) they are the same.
"""
import hashlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optclip


def digest(text: str) -> str:
    text = re.sub(r", metadata=\{[^}]*\}", "", text)
    keep = [ln for ln in text.splitlines() if ln.startswith(("HloModule", "ENTRY", "%", "  "))]
    return hashlib.sha1(re.sub(r"\.\d+", "", "\n".join(keep)).encode()).hexdigest()[:12]


rng = np.random.default_rng(0)
shapes = [(300, 300), (70000,), (5,), (7, 3), (7, 3), (16, 8, 3), (128,)]
tree = {f"w{i}": jnp.asarray(rng.normal(size=s), jnp.float32) for i, s in enumerate(shapes)}
clippers = {
    "gn": optclip.clip_by_global_norm(1.0), "gn1": optclip.clip_by_global_norm(1.0, ord=1),
    "gn3": optclip.clip_by_global_norm(1.0, ord=3), "leaf": optclip.clip_by_leaf_norm(1.0),
    "rms": optclip.clip_by_block_rms(1.0), "agc": optclip.agc(0.01), "adagc": optclip.adagc(),
    "zclip": optclip.zclip(), "autoclip": optclip.autoclip(),
    "value": optclip.clip_by_value(0.1), "clippy": optclip.clippy(0.5, 1e-3),
}
for name, tx in clippers.items():
    print(name, digest(jax.jit(tx.update).lower(tree, tx.init(tree), tree).compile().as_text()))

mesh = jax.make_mesh((8,), ("d",))


def norms(x):
    return (optclip.global_norm(x, axis_name="d"),
            optclip.leaf_norms({"a": x}, axis_name="d")["a"],
            optclip.global_norm(x, ord="inf", axis_name="d"))


f = jax.jit(jax.shard_map(norms, mesh=mesh, in_specs=P("d"), out_specs=P()))
x = jax.device_put(jnp.ones(64), NamedSharding(mesh, P("d")))
print("smap", digest(f.lower(x).compile().as_text()))
