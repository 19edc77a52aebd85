"""skip_nonfinite: a skipped step leaves everything as it was, and is counted."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optclip

P = {"w": jnp.array([1.0, 2.0]), "i": jnp.arange(2)}


def leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_skips_nonfinite_steps(bad):
    inner = optax.chain(optclip.clip_by_global_norm(1.0), optax.adam(1e-2))
    tx = optclip.skip_nonfinite(inner)
    step = jax.jit(tx.update)
    state = tx.init(P)
    good = {"w": jnp.array([0.5, -0.5]), "i": jnp.zeros(2, jnp.int32)}
    _, state = step(good, state, P)
    before = state.inner_state
    u, state = step({"w": jnp.array([bad, 1.0]), "i": jnp.zeros(2, jnp.int32)}, state, P)
    np.testing.assert_array_equal(np.asarray(u["w"]), 0.0)
    leaves_equal(state.inner_state, before)  # bit-identical, counts included
    s = optclip.stats(state)
    assert int(s["skip_nonfinite/skip_count"]) == 1 and bool(s["skip_nonfinite/skipped"])
    _, state = step(good, state, P)
    assert int(state.stats.skip_count) == 1 and not bool(state.stats.skipped)


def test_finite_steps_equal_the_inner_optimizer():
    inner = optax.adam(1e-2)
    tx = optclip.skip_nonfinite(inner)
    s1, s2 = tx.init(P), inner.init(P)
    for k in range(3):
        g = {"w": jnp.array([k + 1.0, -2.0]), "i": jnp.zeros(2, jnp.int32)}
        u1, s1 = tx.update(g, s1, P)
        u2, s2 = inner.update(g, s2, P)
        leaves_equal(u1, u2)
    leaves_equal(s1.inner_state, s2)


def test_large_finite_fp16_is_not_skipped():
    tx = optclip.skip_nonfinite(optax.sgd(1.0))
    g = jnp.full((1000,), 300.0, jnp.float16)  # its fp16 sum of squares would overflow
    u, state = tx.update(g, tx.init(g), g)
    assert not bool(state.stats.skipped)
    np.testing.assert_allclose(float(state.stats.grad_norm), 9486.833, rtol=1e-6)
