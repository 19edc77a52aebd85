"""Adaptive clippers against NumPy references driven by recorded norm sequences."""

import math

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from refs import ZClipRef, adagc_ref, agc_clip, skip_on_spike_ref

import optclip


def norm_sequence(n=80, seed=0):
    """Noisy norms around 1 with spikes, a lasting shift, and a spike right after warm-up."""
    rng = np.random.default_rng(seed)
    seq = 1.0 + 0.1 * np.sin(np.arange(n) / 3.0) + 0.05 * rng.normal(size=n)
    seq[[10, 25, 26, 40, 41, 60]] *= [8.0, 30.0, 5.0, 50.0, 2.0, 12.0]
    seq[65:] *= 3.0
    return seq.astype(np.float32)


DIRECTION = {"a": np.array([0.6, 0.0], np.float32), "b": np.array([[0.8]], np.float32)}


def run_sequence(tx, norms, params=None):
    """Feeds gradients of the given global norms through tx in one scan; per-step outputs."""
    grads = {k: jnp.asarray(norms).reshape((-1,) + (1,) * v.ndim) * v
             for k, v in DIRECTION.items()}
    p0 = jax.tree.map(jnp.ones_like, {k: jnp.asarray(v) for k, v in DIRECTION.items()})

    @jax.jit
    def go(grads):
        def body(s, g):
            u, s = tx.update(g, s, p0 if params is None else params)
            return s, (optclip.global_norm(u), s.stats)
        return jax.lax.scan(body, tx.init(p0), grads)

    state, (out_norms, stats) = go(grads)
    return state, np.asarray(out_norms, np.float64), stats


# --- ZClip ----------------------------------------------------------------------------------

ZCLIP_CONFIGS = [
    {},
    {"warmup_steps": 5},
    {"warmup_steps": 5, "clip_option": "mean"},
    {"warmup_steps": 5, "mode": "percentile"},
    {"warmup_steps": 5, "clip_factor": 0.7, "max_norm": 4.0},
    {"warmup_steps": 5, "skip_update_on_spike": True, "alpha": 0.9, "z_thresh": 2.0},
    {"warmup_steps": 26, "max_norm": 2.0},
]


@pytest.mark.parametrize("cfg", ZCLIP_CONFIGS, ids=str)
def test_zclip_matches_reference_every_step(cfg):
    norms = norm_sequence()
    ref = ZClipRef(**cfg)
    want = np.array([g * ref.step(float(g)) for g in norms.astype(np.float64)])
    _, got, stats = run_sequence(optclip.zclip(**cfg), norms)
    np.testing.assert_allclose(got, want, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(stats.grad_norm), norms, rtol=1e-6)
    clipped = np.asarray(stats.clipped)
    assert clipped.sum() >= 3  # the spikes were clipped
    np.testing.assert_allclose(np.asarray(stats.threshold)[clipped], want[clipped], rtol=2e-5)


def test_zclip_warmup_only_caps():
    norms = norm_sequence()
    _, got, stats = run_sequence(optclip.zclip(warmup_steps=30, max_norm=5.0), norms)
    np.testing.assert_allclose(got[:30], np.minimum(norms[:30], 5.0), rtol=1e-6)
    _, got, _ = run_sequence(optclip.zclip(warmup_steps=30), norms)
    np.testing.assert_allclose(got[:30], norms[:30], rtol=1e-6)


def test_zclip_ignores_nonfinite_norms():
    norms = norm_sequence()
    bad = norms.copy()
    bad[30] = np.nan
    state_bad, _, stats = run_sequence(optclip.zclip(warmup_steps=5), bad)
    assert bool(np.asarray(stats.nonfinite)[30])
    assert np.isfinite(float(state_bad.ema.mean)) and np.isfinite(float(state_bad.ema.var))
    assert int(state_bad.ema.count) == len(norms) - 1


# --- AutoClip -------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [1, 7, 30])
@pytest.mark.parametrize("q", [0.0, 10.0, 50.0, 95.0])
def test_autoclip_window_is_numpy_percentile(window, q):
    norms = norm_sequence()
    want_thr = [np.percentile(norms[max(0, t + 1 - window):t + 1].astype(np.float64), q)
                for t in range(len(norms))]
    _, got, stats = run_sequence(optclip.autoclip(q, history=window), norms)
    # float32 interpolation against float64 NumPy
    np.testing.assert_allclose(np.asarray(stats.threshold), want_thr, rtol=1e-5)
    np.testing.assert_allclose(got, np.minimum(norms, want_thr), rtol=1e-5)


@pytest.mark.parametrize("q", [0.0, 10.0, 50.0, 90.0, 100.0])
def test_autoclip_sketch_within_one_percent(q):
    rng = np.random.default_rng(1)
    norms = np.exp(rng.normal(0.0, 2.0, size=300)).astype(np.float32) * 1e-3
    norms[::37] = 0.0
    want_thr = np.array([np.percentile(norms[:t + 1].astype(np.float64), q)
                         for t in range(len(norms))])
    state, got, stats = run_sequence(optclip.autoclip(q), norms)
    thr = np.asarray(stats.threshold, np.float64)
    np.testing.assert_allclose(thr, want_thr, rtol=0.005 * 1.01, atol=0)  # the documented 0.5%
    assert state.history.shape == (optclip.adaptive.SKETCH_BUCKETS,)  # fixed memory
    assert int(jnp.sum(state.history)) == len(norms)


@settings(max_examples=15)
@given(st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=12), st.floats(0, 100),
       st.integers(1, 5))
def test_autoclip_window_property(seq, q, window):
    tx = optclip.autoclip(q, history=window)
    state = tx.init(None)
    step = jax.jit(tx.update)
    for t, g in enumerate(seq):
        _, state = step(jnp.array([g], jnp.float32), state)
        want = np.percentile(np.float32(seq[max(0, t + 1 - window):t + 1]), q)
        np.testing.assert_allclose(float(state.stats.threshold), want, rtol=1e-5)


def test_autoclip_skips_nonfinite_in_history():
    tx = optclip.autoclip(50.0, history=4)
    state = tx.init(None)
    for g in (1.0, jnp.nan, 3.0):
        _, state = tx.update(jnp.array([g]), state)
    assert int(state.count) == 2 and float(state.stats.threshold) == 2.0


# --- AdaGC ----------------------------------------------------------------------------------

def test_adagc_matches_reference_every_step():
    rng = np.random.default_rng(2)
    t_steps, warm = 80, 8
    scales = np.stack([norm_sequence(t_steps, seed=3), norm_sequence(t_steps, seed=4) * 0.1,
                       np.full(t_steps, 0.5, np.float32)], axis=1)
    base = [rng.normal(size=(3,)).astype(np.float32), rng.normal(size=(2, 2)).astype(np.float32),
            rng.normal(size=()).astype(np.float32)]
    base = [b / np.linalg.norm(b) for b in base]
    grads = [jnp.asarray(scales[:, i].reshape((-1,) + (1,) * b.ndim) * b)
             for i, b in enumerate(base)]
    tx = optclip.adagc(lambda_rel=1.05, beta=0.9, warmup_steps=warm, lambda_abs=1.0)
    p0 = [jnp.zeros_like(g[0]) for g in grads]

    @jax.jit
    def go(grads):
        def body(s, g):
            u, s = tx.update(g, s)
            return s, ([optclip.global_norm(x) for x in u], s.stats.threshold)
        return jax.lax.scan(body, tx.init(p0), grads)

    _, (out, _) = go(grads)
    h = np.array(adagc_ref(scales, 1.05, 0.9, warm, 1.0))
    np.testing.assert_allclose(np.stack(out, 1), h * scales, rtol=1e-5)
    assert np.any(h[warm:] < 1)  # the per-tensor rule engaged after warm-up


def test_adagc_checks_leaf_count():
    tx = optclip.adagc()
    state = tx.init({"a": jnp.zeros(2)})
    with pytest.raises(ValueError, match="float leaves"):
        tx.update({"a": jnp.zeros(2), "b": jnp.zeros(1)}, state)


# --- AGC ------------------------------------------------------------------------------------

@settings(max_examples=15)
@given(st.integers(0, 2**31 - 1), st.floats(1e-3, 0.5))
def test_agc_matches_reference(seed, clipping):
    rng = np.random.default_rng(seed)
    shapes = {"dense": (3, 4), "conv": (2, 2, 3, 4), "bias": (4,), "scalar": (), "heads": (2, 3, 4)}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    params["bias"] = np.zeros(4, np.float32)  # zero-initialised: eps floor applies
    grads = {k: (rng.normal(size=s) * 10 ** rng.uniform(-3, 2)).astype(np.float32)
             for k, s in shapes.items()}
    tx = optclip.agc(clipping, eps=1e-3)
    out, state = tx.update(grads, tx.init(params), params)
    axes = {"dense": (0,), "conv": (0, 1, 2), "bias": None, "scalar": None, "heads": (0, 1)}
    for k in shapes:
        want = agc_clip(grads[k].astype(np.float64), params[k].astype(np.float64), clipping,
                        1e-3, axes[k])
        np.testing.assert_allclose(np.asarray(out[k]), want, rtol=1e-5, atol=1e-30)
        unit = np.sqrt(np.sum(np.square(np.asarray(out[k], np.float64)), axis=axes[k],
                              keepdims=axes[k] is not None))
        wn = np.maximum(np.sqrt(np.sum(np.square(params[k]), axis=axes[k],
                                       keepdims=axes[k] is not None)), 1e-3)
        assert np.all(unit <= clipping * wn * (1 + 1e-5))


def test_agc_optax_parity_on_2d_and_4d():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
              "c": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
    grads = jax.tree.map(lambda p: p * 7.0 + 0.1, params)
    ours, _ = optclip.agc(0.05).update(grads, optclip.agc(0.05).init(params), params)
    theirs, _ = optax.adaptive_grad_clip(0.05).update(grads, optax.EmptyState(), params)
    for k in params:
        np.testing.assert_allclose(np.asarray(ours[k]), np.asarray(theirs[k]), rtol=1e-5)


def test_agc_explicit_axis_and_missing_params():
    tx = optclip.agc(0.1, axis=1)
    w = {"k": jnp.ones((2, 3))}
    out, _ = tx.update({"k": jnp.full((2, 3), 5.0)}, tx.init(w), w)
    np.testing.assert_allclose(np.asarray(optclip.unitwise_norm(out["k"], axis=1)),
                               0.1 * math.sqrt(3), rtol=1e-6)
    with pytest.raises(ValueError, match="needs them"):
        tx.update(w, tx.init(w))


# --- skip_on_spike --------------------------------------------------------------------------

def test_skip_on_spike_matches_reference_and_freezes_inner():
    norms = norm_sequence()
    norms[50] = np.inf
    want = skip_on_spike_ref(norms.astype(np.float64), z_thresh=3.0, warmup_steps=10)
    tx = optclip.skip_on_spike(optax.adam(1e-2), z_thresh=3.0, warmup_steps=10)
    state, got, stats = run_sequence(tx, norms)
    skipped = np.asarray(stats.skipped)
    np.testing.assert_array_equal(skipped, want)
    assert skipped.sum() >= 3 and int(state.stats.skip_count) == skipped.sum()
    assert np.all(got[skipped] == 0)
    # adam's count advanced only on the steps that were taken
    assert int(state.inner_state[0].count) == len(norms) - skipped.sum()


# --- shared behaviour -----------------------------------------------------------------------

ADAPTIVE = {
    "agc": lambda: optclip.agc(0.05),
    "autoclip": lambda: optclip.autoclip(10.0),
    "autoclip_window": lambda: optclip.autoclip(10.0, history=16),
    "zclip": lambda: optclip.zclip(warmup_steps=5, max_norm=1.0),
    "adagc": lambda: optclip.adagc(warmup_steps=5),
    "skip_on_spike": lambda: optclip.skip_on_spike(optax.identity(), warmup_steps=5),
}

A = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
X_STAR = np.array([1.0, -2.0, 3.0, 0.5], np.float32)


def lsq_loss(x):
    return 0.5 * jnp.mean((jnp.asarray(A) @ x["w"] - jnp.asarray(A @ X_STAR)) ** 2)


def lsq_run(tx, steps):
    @jax.jit
    def run(x):
        def body(carry, _):
            x, s = carry
            u, s = tx.update(jax.grad(lsq_loss)(x), s, x)
            return (optax.apply_updates(x, u), s), None
        return jax.lax.scan(body, (x, tx.init(x)), None, length=steps)[0]
    return run


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_trains_with_adam(name):
    tx = optax.chain(ADAPTIVE[name](), optax.adam(optax.exponential_decay(0.1, 300, 0.3)))
    x, state = lsq_run(tx, 1500)({"w": jnp.full((4,), 0.1)})
    np.testing.assert_allclose(np.asarray(x["w"]), X_STAR, atol=2e-2)
    assert set(optclip.stats(state)) >= {"grad_norm", "threshold"}


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_checkpoint_restore_is_bit_identical(name):
    tx = optax.chain(ADAPTIVE[name](), optax.adam(1e-2))
    x0 = {"w": jnp.full((4,), 0.1)}
    step = jax.jit(lambda x, s: (lambda u, s: (optax.apply_updates(x, u), s))(
        *tx.update(jax.grad(lsq_loss)(x), s, x)))
    x, s = x0, tx.init(x0)
    for _ in range(8):
        x, s = step(x, s)
    blob = flax.serialization.to_bytes((x, s))
    restored = flax.serialization.from_bytes((x0, tx.init(x0)), blob)
    a, b = (x, s), restored
    for _ in range(8):
        a = step(*a)
        b = step(*b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.parametrize("factory,kw", [(optclip.agc, "clipping"), (optclip.autoclip, "percentile"),
                                        (optclip.zclip, "z_thresh"), (optclip.adagc, "lambda_rel")])
def test_inject_hyperparams(factory, kw):
    tx = optax.inject_hyperparams(factory)(**{kw: 1.0})
    x = {"w": jnp.ones(4)}
    state = tx.init(x)
    _, state = jax.jit(tx.update)(x, state, x)
    assert float(optclip.stats(state)["grad_norm"]) == 2.0


@pytest.mark.parametrize("call,match", [
    (lambda: optclip.autoclip(101.0), r"percentile must lie in \[0.0, 100.0\]"),
    (lambda: optclip.autoclip(-1.0), "percentile must lie in"),
    (lambda: optclip.autoclip(10.0, history=0), "history must be an int >= 1"),
    (lambda: optclip.autoclip(10.0, history=jnp.asarray(3)), "static_args"),
    (lambda: optclip.zclip(alpha=1.0), r"alpha must lie in \[0.0, 1.0\)"),
    (lambda: optclip.zclip(alpha=-0.1), "alpha must lie in"),
    (lambda: optclip.zclip(warmup_steps=0), "warmup_steps must be an int >= 1"),
    (lambda: optclip.zclip(mode="median"), "mode must be one of"),
    (lambda: optclip.zclip(clip_option="max"), "clip_option must be one of"),
    (lambda: optclip.zclip(z_thresh=-1.0), "z_thresh must be >= 0"),
    (lambda: optclip.zclip(max_norm=-1.0), "max_norm must be >= 0"),
    (lambda: optclip.adagc(beta=1.5), "beta must lie in"),
    (lambda: optclip.adagc(warmup_steps=0), "warmup_steps must be"),
    (lambda: optclip.adagc(lambda_abs=-1.0), "lambda_abs must be >= 0"),
    (lambda: optclip.agc(-0.01), "clipping must be >= 0"),
    (lambda: optclip.agc(0.01, eps=float("nan")), "eps must be >= 0"),
    (lambda: optclip.skip_on_spike(optax.sgd(1.0), alpha=2.0), "alpha must lie in"),
    (lambda: optclip.skip_on_spike(optax.sgd(1.0), warmup_steps=0), "warmup_steps"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- run-time edges (issue 9) -------------------------------------------------------------------

def test_autoclip_sketch_is_exact_at_its_extremes():
    # the percentile of one norm is that norm: nothing to clip on the first step
    tx = optclip.autoclip()
    u, state = tx.update(jnp.array([3.0, 4.0]), tx.init(None))
    assert not bool(state.stats.clipped) and float(state.stats.threshold) == 5.0
    np.testing.assert_array_equal(np.asarray(u), [3.0, 4.0])
    # the 0th and 100th percentiles of a history are its exact min and max
    for q, pick in ((0.0, min), (100.0, max)):
        tx = optclip.autoclip(q)
        state = tx.init(None)
        seq = [1.2345, 7.891, 0.4321, 3.3]
        for g in seq:
            _, state = tx.update(jnp.array([g]), state)
        assert float(state.stats.threshold) == np.float32(pick(seq))


def test_autoclip_window_survives_count_saturation():
    tx = optclip.autoclip(50.0, history=3)
    state = tx.init(None)
    top = np.iinfo(np.int32).max
    state = state._replace(count=jnp.int32(top - 4))
    step = jax.jit(tx.update)
    seq = [1.0, 4.0, 2.0, 8.0, 16.0, 3.0, 5.0]
    for t, g in enumerate(seq):
        _, state = step(jnp.array([g]), state)
        window = seq[max(0, t - 2): t + 1]
        if t >= 2:
            assert float(state.stats.threshold) == np.percentile(window, 50.0), t
        assert np.isfinite(float(state.stats.threshold))


def test_float64_norm_beyond_float32_range():
    with jax.enable_x64(True):
        g = {"w": jnp.array([1e200, 1e200], jnp.float64)}
        for tx in (optclip.autoclip(), optclip.autoclip(history=4), optclip.zclip(warmup_steps=2)):
            state = tx.init(g)
            for k in range(4):
                u, state = tx.update(jax.tree.map(lambda x, k=k: x * (1 + 0.01 * k), g), state)
                assert np.isfinite(np.asarray(u["w"])).all()
            assert np.isfinite(float(state.ema.mean if hasattr(state, "ema") else
                                     state.history[0]))
            assert not bool(state.stats.nonfinite)
