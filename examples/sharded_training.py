"""Clipping a model sharded across 8 devices, with JAX's own sharding.

Runs on any machine: it asks XLA for 8 simulated CPU devices. Two styles:

1. ``jit`` with FSDP-style ``NamedSharding``: the parameters, gradients and
   optimizer state are split along their first axis across the ``data``
   mesh axis. The clipper needs no ``axis_name``: XLA sees whole arrays and
   inserts the cross-device reductions itself.
2. ``shard_map``: the step runs per device on its shard, so the clipper is
   told which mesh axis the gradients are split along (``axis_name``).

Both print the global gradient norm each step next to the same step run on
one device: they agree.

Run:  python examples/sharded_training.py
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optclip  # noqa: E402

STEPS = 5


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(16, 64, rngs=rngs)
        self.l2 = nnx.Linear(64, 64, rngs=rngs)
        self.l3 = nnx.Linear(64, 8, rngs=rngs)

    def __call__(self, x):
        return self.l3(jax.nn.relu(self.l2(jax.nn.relu(self.l1(x)))))


def data(step):
    rng = np.random.default_rng(step)
    x = rng.normal(size=(64, 16)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(np.sin(x[:, :8] * 3.0) * 5.0)


def make():
    graphdef, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)

    def loss_fn(params, x, y):
        return jnp.mean((nnx.merge(graphdef, params)(x) - y) ** 2)

    return params, loss_fn


def fsdp_spec(x):
    """Split the first axis across 'data' where it divides evenly; replicate the rest."""
    return P("data") if x.ndim >= 1 and x.shape[0] % 8 == 0 else P()


def train_jit(mesh=None):
    params, loss_fn = make()
    tx = optax.chain(optclip.clip_by_global_norm(1.0), optax.adam(1e-2))
    if mesh is not None:  # FSDP: place every array on the mesh; jit follows the placement
        params = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, fsdp_spec(x))),
                              params)
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    norms = []
    for t in range(STEPS):
        params, state = step(params, state, *data(t))
        norms.append(float(optclip.stats(state)["grad_norm"]))
    return norms, params


def train_shard_map(mesh):
    params, loss_fn = make()
    specs = jax.tree.map(fsdp_spec, params)
    # Inside shard_map each device holds a slice: the norm must combine the slices.
    # partition_specs says, leaf by leaf, which mesh axes split it (a replicated leaf, P(),
    # is counted once). When every leaf is split, axis_name="data" does the same.
    tx = optax.chain(optclip.clip_by_global_norm(1.0, partition_specs=specs), optax.adam(1e-2))
    params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
    state = tx.init(params)
    # Adam's moments are shaped like the params and split like them; the clipper's state
    # (a step count and its stats) is scalars, replicated on every device.
    state_specs = jax.tree.map(fsdp_spec, state)

    def local_step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    sharded = jax.shard_map(local_step, mesh=mesh, in_specs=(specs, state_specs, specs),
                            out_specs=(specs, state_specs))

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)  # whole arrays, sharded by jit
        return sharded(params, state, grads)

    norms = []
    for t in range(STEPS):
        params, state = step(params, state, *data(t))
        norms.append(float(optclip.stats(state)["grad_norm"]))
    return norms


def main():
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    print(f"{len(jax.devices())} devices; mesh {dict(mesh.shape)}")
    single, _ = train_jit(None)
    fsdp, params = train_jit(mesh)
    smap = train_shard_map(mesh)
    print(f"l2.kernel is sharded as {params['l2']['kernel'].sharding.spec}")
    print(f"{'step':>4}  {'one device':>12}  {'jit+FSDP':>12}  {'shard_map':>12}")
    for t in range(STEPS):
        print(f"{t:4d}  {single[t]:12.6f}  {fsdp[t]:12.6f}  {smap[t]:12.6f}")
    worst = max(abs(a - b) / a for run in (fsdp, smap) for a, b in zip(single, run, strict=True))
    ok = np.allclose(single, fsdp, rtol=1e-5) and np.allclose(single, smap, rtol=1e-5)
    print(f"global norms match the one-device run: {ok} (largest relative gap {worst:.1e})")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
