"""optclip.stats finds every record, in any state, from the one norm that decided."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optclip

G = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([0.0])}
P = jax.tree.map(jnp.zeros_like, G)


def run(tx, g=G, steps=1):
    state = tx.init(P)
    for _ in range(steps):
        _, state = tx.update(g, state, P)
    return state


def test_single_clipper_keys_are_exact():
    s = optclip.stats(run(optax.chain(optclip.clip_by_global_norm(1.0), optax.adam(1e-3))))
    assert list(s) == list(optclip.ClipStats._fields)
    assert list(s)[:4] == ["grad_norm", "threshold", "scale", "clipped"]
    assert float(s["grad_norm"]) == 5.0 and float(s["threshold"]) == 1.0
    np.testing.assert_allclose(float(s["scale"]), 0.2, rtol=1e-6)
    assert bool(s["clipped"])


@pytest.mark.parametrize("wrap", ["inject", "multisteps", "masked", "guard", "multi_transform"])
def test_found_through_wrappers(wrap):
    clip = optclip.clip_by_global_norm(1.0)
    if wrap == "inject":
        tx = optax.chain(optax.inject_hyperparams(optclip.clip_by_global_norm)(max_norm=1.0),
                         optax.sgd(0.1))
    elif wrap == "multisteps":
        tx = optax.MultiSteps(optax.chain(clip, optax.sgd(0.1)), every_k_schedule=2)
    elif wrap == "masked":
        tx = optax.masked(clip, {"w": True, "b": False})
    elif wrap == "guard":
        tx = optclip.skip_nonfinite(optax.chain(clip, optax.sgd(0.1)))
    else:
        tx = optax.multi_transform({"a": clip, "z": optax.set_to_zero()}, {"w": "a", "b": "z"})
    s = optclip.stats(run(tx, steps=2))  # MultiSteps applies the inner step every 2nd call
    key = "clip_by_global_norm/grad_norm" if wrap == "guard" else "grad_norm"
    assert float(s[key]) == 5.0
    if wrap == "guard":
        assert set(s) == {f"clip_by_global_norm/{k}" for k in
                          (*optclip.ClipStats._fields, "stale")} | {
                              f"skip_nonfinite/{k}" for k in optclip.GuardStats._fields}


def test_several_clippers_are_prefixed():
    tx = optax.chain(optclip.clip_by_value(2.0), optclip.clip_by_value(1.0),
                     optclip.clip_by_global_norm(1.0), optax.sgd(0.1))
    s = optclip.stats(run(tx))
    assert float(s["clip_by_value_0/threshold"]) == 2.0
    assert float(s["clip_by_value_1/threshold"]) == 1.0
    # the global clipper saw what the value clippers let through: [1, 1, 0]
    np.testing.assert_allclose(float(s["clip_by_global_norm/grad_norm"]), 2**0.5, rtol=1e-6)
    assert len(s) == 3 * len(optclip.ClipStats._fields)


def test_no_clipper_warns_and_gives_empty_dict():
    with pytest.warns(UserWarning, match="found no optclip clipper"):
        assert optclip.stats(run(optax.adam(1e-3))) == {}


def test_found_in_flax_nnx_optimizer():
    from flax import nnx

    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.chain(optclip.clip_by_global_norm(0.1), optax.sgd(0.1)),
                        wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 2))) ** 2 + 10.0))(model)
        opt.update(model, grads)

    step(model, opt)
    s = optclip.stats(opt.opt_state)
    assert set(s) == set(optclip.ClipStats._fields)
    assert float(s["grad_norm"]) > 0.1 and bool(s["clipped"])


def test_stats_norm_is_the_norm_that_decided():
    # The update is exactly grads * stats.scale, and scale == threshold / grad_norm.
    tx = optclip.clip_by_global_norm(1.5)
    g = {"a": jnp.array([1.0, 2.0, 3.0]), "b": jnp.array([[4.0]])}
    out, state = jax.jit(tx.update)(g, tx.init(g))
    s = optclip.stats(state)
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(out), strict=True):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x * s["scale"]))
    assert float(s["scale"]) == float(jnp.float32(1.5) / s["grad_norm"])


def test_norm_is_computed_once_per_step():
    # One reduction over the gradients on the fast path: a second norm would add a second
    # reduce_sum (the rescaled path sits inside the cond and runs only on overflow).
    tx = optclip.clip_by_global_norm(1.0)
    jaxpr = jax.make_jaxpr(lambda g: tx.update(g, tx.init(g)))(jnp.ones(4))
    top = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    # (the two factors of the clip are each taken out of their pair by a sum over 2 values)
    over_grads = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "reduce_sum"
                  and e.invars[0].aval.shape != (2,)]
    assert len(over_grads) == 1, top
    assert top.count("cond") == 1


def test_stats_in_scan_history_without_host_sync():
    tx = optax.chain(optclip.clip_by_global_norm(1.0), optax.sgd(0.1))

    def body(carry, g):
        x, s = carry
        u, s = tx.update(g, s, x)
        return (x + u, s), optclip.stats(s)

    grads = jnp.stack([jnp.array([3.0, 4.0]), jnp.array([0.3, 0.4])])
    _, hist = jax.lax.scan(body, (jnp.zeros(2), tx.init(jnp.zeros(2))), grads)
    np.testing.assert_allclose(np.asarray(hist["grad_norm"]), [5.0, 0.5], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(hist["clipped"]), [True, False])


# --- logging every N steps (issue 9) ------------------------------------------------------------

def test_counters_and_peak_catch_a_spike_between_logs():
    tx = optax.chain(optclip.clip_by_global_norm(10.0), optax.sgd(0.1))
    state = tx.init(P)
    step = jax.jit(tx.update)
    seen = []
    for t in range(40):
        g = jax.tree.map(lambda x, t=t: x * (1000.0 if t == 37 else 1.0), G)
        _, state = step(g, state, P)
        if t % 10 == 9:  # the logger reads every 10 steps, and resets the peak
            s = optclip.stats(state, host=True)
            seen.append((s["peak_grad_norm"], s["clip_count"], s["grad_norm"]))
            state = optclip.reset_peaks(state)
    assert [round(p) for p, _, _ in seen] == [5, 5, 5, 5000]  # the spike at step 37
    assert [c for _, c, _ in seen] == [0, 0, 0, 1]
    assert seen[-1][2] == 5.0  # the latest norm alone would have missed it


def test_nonfinite_count():
    tx = optclip.clip_by_global_norm(1.0)
    state = tx.init(P)
    for bad in (False, True, False, True, True):
        g = {"w": jnp.array([jnp.nan if bad else 1.0, 0.0]), "b": G["b"]}
        _, state = tx.update(g, state)
    s = optclip.stats(state, host=True)
    assert s["nonfinite_count"] == 3 and s["nonfinite"] is True
    assert s["peak_grad_norm"] == 1.0  # a NaN norm is counted, not taken as the peak


def test_prefix_keys_are_stable_under_a_guard():
    inner = optax.chain(optclip.clip_by_global_norm(1.0), optax.sgd(0.1))
    bare = optclip.stats(run(inner), prefix=True)
    guarded = optclip.stats(run(optclip.skip_nonfinite(inner)), prefix=True)
    assert "clip_by_global_norm/grad_norm" in bare
    assert set(bare) <= set(guarded)
    assert float(bare["clip_by_global_norm/grad_norm"]) == 5.0


def test_host_values_are_python_scalars_for_json():
    import json

    tx = optclip.skip_nonfinite(optax.chain(optclip.clip_by_global_norm(1.0), optax.sgd(0.1)))
    s = optclip.stats(run(tx), host=True)
    assert all(type(v) in (float, int, bool) for v in s.values()), s
    assert json.loads(json.dumps(s)) == s


def test_stale_record_is_marked_after_a_skipped_step():
    tx = optclip.skip_nonfinite(optax.chain(optclip.clip_by_global_norm(1.0), optax.sgd(0.1)))
    state = tx.init(P)
    _, state = tx.update(G, state, P)
    assert not bool(optclip.stats(state)["clip_by_global_norm/stale"])
    _, state = tx.update(jax.tree.map(lambda x: x * jnp.nan, G), state, P)
    s = optclip.stats(state)
    assert bool(s["clip_by_global_norm/stale"]) and float(s["clip_by_global_norm/grad_norm"]) == 5
    _, state = tx.update(G, state, P)
    assert not bool(optclip.stats(state)["clip_by_global_norm/stale"])


def test_nnx_optimizer_read_without_deprecated_api():
    import warnings

    from flax import nnx

    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optclip.clip_by_global_norm(0.1), wrt=nnx.Param)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        s = optclip.stats(opt.opt_state)
        assert set(s) == set(optclip.ClipStats._fields)
