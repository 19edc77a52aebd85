"""The 128 MB float32 arrays and the masked min that the scripts here time: a min whose
operand holds a select, which XLA:CPU writes out first, a 128 MB temporary
(``python -m bench.xla_probe reduce_fusion``)."""

import resource

import jax
import jax.numpy as jnp
import numpy as np

N = 32 * 1024 * 1024  # 128 MB of float32


def arrays() -> tuple[jax.Array, jax.Array]:
    x = jnp.asarray(np.random.default_rng(0).standard_normal((N,), np.float32))
    return x, x * 0.5 + 1


def bound(w: jax.Array) -> jax.Array:
    return 0.1 * jnp.abs(w) + 1e-7


def masked(x: jax.Array, w: jax.Array) -> jax.Array:
    nz = x != 0
    return jnp.where(nz, bound(w) / jnp.where(nz, jnp.abs(x), 1.0), jnp.inf)


def masked_min(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.min(masked(x, w))


def faults_per_call(f, *args, calls: int = 10) -> list[int]:
    """The minor page faults of each of ``calls`` calls of ``f(*args)``."""
    faults = []
    for _ in range(calls):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        jax.block_until_ready(f(*args))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return faults
