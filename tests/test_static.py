"""Static clippers against NumPy references, Optax, and their promised properties."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from refs import block_rms_clip, global_clip, leaf_clip, np_leaves, pnorm
from strategies import ords, trees

import optclip

# 0, or a threshold in a range where max_norm / norm stays a normal float32.
thresholds = st.just(0.0) | st.floats(1e-3, 1e3)


def atol(dtype):
    """Absolute precision near zero: the spacing of subnormals (flushed to zero for float32)."""
    info = jnp.finfo(dtype)
    return float(info.tiny) if dtype == jnp.float32 else 2 * float(info.smallest_subnormal)


def apply(tx, tree, params=None):
    return tx.update(tree, tx.init(tree), params)


def as_np(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


# --- references ---------------------------------------------------------------------------

@given(trees(dtypes=("float32", "float16", "bfloat16")), thresholds, ords)
def test_global_norm_clip_matches_reference(tree, max_norm, p):
    got, state = apply(optclip.clip_by_global_norm(max_norm, ord=p), tree)
    ref, g, scale = global_clip(np_leaves(jax.tree.leaves(tree)), max_norm, p)
    if not math.isfinite(g):
        return
    for x, y, r in zip(jax.tree.leaves(tree), jax.tree.leaves(got), ref, strict=True):
        assert y.dtype == x.dtype
        tol = 1e-5 if x.dtype == jnp.float32 else 1e-2
        np.testing.assert_allclose(np.asarray(y, np.float64), r, rtol=tol, atol=atol(x.dtype))
    np.testing.assert_allclose(float(state.stats.grad_norm), g, rtol=2e-5)
    np.testing.assert_allclose(float(state.stats.scale), scale, rtol=2e-5)
    assert bool(state.stats.clipped) == (scale != 1.0)


@given(trees(), thresholds, st.floats(0.0, 1.0))
def test_min_norm_matches_reference(tree, max_norm, frac):
    min_norm = max_norm * frac
    got, _ = apply(optclip.clip_by_global_norm(max_norm, min_norm=min_norm), tree)
    ref, _, _ = global_clip(as_np(tree), max_norm, 2.0, min_norm)
    for y, r in zip(jax.tree.leaves(got), ref, strict=True):
        np.testing.assert_allclose(np.asarray(y, np.float64), r, rtol=1e-5, atol=atol(jnp.float32))


@given(trees(dtypes=("float32", "bfloat16")), thresholds, ords)
def test_leaf_norm_clip_matches_reference(tree, max_norm, p):
    got, state = apply(optclip.clip_by_leaf_norm(max_norm, ord=p), tree)
    leaves = np_leaves(jax.tree.leaves(tree))
    if not all(math.isfinite(pnorm([a], p)) for a in leaves):
        return
    for y, r in zip(jax.tree.leaves(got), leaf_clip(leaves, max_norm, p), strict=True):
        np.testing.assert_allclose(np.asarray(y, np.float64), r, rtol=1e-2 if y.dtype !=
                                   jnp.float32 else 1e-5, atol=atol(y.dtype))


@given(trees(), thresholds)
def test_block_rms_clip_matches_reference(tree, t):
    got, _ = apply(optclip.clip_by_block_rms(t), tree)
    for y, r in zip(jax.tree.leaves(got), block_rms_clip(as_np(tree), t), strict=True):
        np.testing.assert_allclose(np.asarray(y, np.float64), r, rtol=1e-5, atol=atol(jnp.float32))


@jax.jit
def _value_clip(tree, hi, lo):
    return apply(optclip.clip_by_value(hi, lo), tree)


# bounds passed traced: a subnormal one is flushed to 0 by XLA:CPU under jit (README, Limits)
@given(trees(), st.floats(0.0, 10.0, allow_subnormal=False, width=32),
       st.floats(-10.0, 0.0, allow_subnormal=False, width=32))
def test_value_clip_matches_numpy(tree, hi, lo):
    got, state = _value_clip(tree, jnp.float32(hi), jnp.float32(lo))
    for x, y in zip(as_np(tree), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(y, np.float64),
                                      np.clip(x, np.float32(lo), np.float32(hi)))
    outside = any(np.any((x > np.float32(hi)) | (x < np.float32(lo))) for x in as_np(tree))
    assert bool(state.stats.clipped) == outside


# --- properties -----------------------------------------------------------------------------

CLIPPERS = {
    "global_norm": lambda t: optclip.clip_by_global_norm(t),
    "global_norm_l1": lambda t: optclip.clip_by_global_norm(t, ord=1),
    "global_norm_linf": lambda t: optclip.clip_by_global_norm(t, ord=math.inf),
    "leaf_norm": lambda t: optclip.clip_by_leaf_norm(t),
    "block_rms": lambda t: optclip.clip_by_block_rms(t),
    "value": lambda t: optclip.clip_by_value(t),
}


@functools.partial(jax.jit, static_argnums=0)
def jit_apply(name, tree, t):
    """``apply(CLIPPERS[name](t), tree)``, compiled once per clipper and tree shape, with
    the threshold traced (eagerly, each ``lax.cond`` would compile anew for every example)."""
    return apply(CLIPPERS[name](t), tree)


@pytest.mark.parametrize("name", ["global_norm", "global_norm_l1", "global_norm_linf"])
@given(tree=trees(), max_norm=st.floats(1e-3, 1e3))
def test_output_norm_at_most_threshold_and_direction_kept(name, tree, max_norm):
    p = {"global_norm": 2.0, "global_norm_l1": 1.0, "global_norm_linf": math.inf}[name]
    got, _ = apply(CLIPPERS[name](max_norm), tree)
    assert float(optclip.global_norm(got, ord=p)) <= max_norm * (1 + 1e-6)
    a = np.concatenate([x.ravel() for x in as_np(tree)])
    b = np.concatenate([x.ravel() for x in as_np(got)])
    if np.linalg.norm(a) > 0:  # same direction: b = c * a with c > 0
        cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        np.testing.assert_allclose(cos, 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CLIPPERS))
@settings(max_examples=12)
@given(tree=trees(), t=st.floats(1e-3, 1e3))
def test_idempotent_and_unchanged_below_threshold(name, tree, t):
    t = jnp.float32(t)
    once, _ = jit_apply(name, tree, t)
    twice, state = jit_apply(name, once, t)
    for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(twice), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-6, atol=0)
    # far below the threshold nothing changes, bit for bit
    small = jax.tree.map(lambda x: x * 0 + 1e-6, tree)
    out, state = jit_apply(name, small, t)
    for a, b in zip(jax.tree.leaves(small), jax.tree.leaves(out), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not bool(state.stats.clipped)


@pytest.mark.parametrize("name", sorted(CLIPPERS))
def test_jit_equals_eager(name):
    tx = CLIPPERS[name](1.0)
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.array([-5.0, 0.5])}
    eager, s1 = apply(tx, tree)
    jitted, s2 = jax.jit(lambda t: apply(tx, t))(tree)
    for a, b in zip(jax.tree.leaves((eager, s1)), jax.tree.leaves((jitted, s2)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


# --- where optclip differs from Optax, on purpose -----------------------------------------

@jax.jit
def _parity_pairs(tree, max_norm):
    """optclip's and Optax's results, side by side, in one compiled call with a traced
    threshold (eagerly, every ``lax.cond`` compiled anew for each example)."""
    pairs = [(optclip.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)),
             (optclip.clip_by_block_rms(max_norm), optax.clip_by_block_rms(max_norm)),
             (optclip.clip_by_value(max_norm), optax.clip(max_norm))]
    return [(apply(ours, tree)[0], apply(theirs, tree)[0]) for ours, theirs in pairs]


@given(trees(), st.floats(1e-3, 1e3))
def test_optax_parity_float32(tree, max_norm):
    # Optax is right where its float32 sum of squares neither overflows nor underflows.
    sq = float(sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(tree)))
    assume(1e-30 < sq < 1e38)
    # Optax divides by the norm before it multiplies by max_norm: an element below
    # tiny * norm becomes subnormal there and is flushed to 0 (1e-22 among 1e16 with
    # max_norm=2: Optax 0, the true 2e-38). Its error is up to tiny * max_norm.
    tol = atol(jnp.float32) * max(1.0, max_norm)
    (gn, gn_ref), (rms, rms_ref), (val, val_ref) = _parity_pairs(tree, jnp.float32(max_norm))
    for ours, theirs in [(gn, gn_ref), (rms, rms_ref)]:
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=tol)
    for a, b in zip(jax.tree.leaves(val), jax.tree.leaves(val_ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_differs_from_optax_fp16_overflow():
    g = {"w": jnp.full((1000,), 300.0, jnp.float16)}
    theirs, _ = apply(optax.clip_by_global_norm(1.0), g)
    assert not np.any(np.asarray(theirs["w"], np.float32))  # Optax: norm inf, all zeros
    ours, state = apply(optclip.clip_by_global_norm(1.0), g)
    assert ours["w"].dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(ours["w"], np.float32), 1 / math.sqrt(1000), rtol=1e-3)
    np.testing.assert_allclose(float(state.stats.grad_norm), 9486.833, rtol=1e-6)


def test_differs_from_optax_zero_threshold_zero_gradient():
    g = {"w": jnp.zeros(3)}
    theirs, _ = apply(optax.clip_by_global_norm(0.0), g)
    assert np.all(np.isnan(np.asarray(theirs["w"])))  # Optax: 0 / 0
    ours, state = apply(optclip.clip_by_global_norm(0.0), g)
    np.testing.assert_array_equal(np.asarray(ours["w"]), 0.0)
    assert float(state.stats.scale) == 1.0 and not bool(state.stats.clipped)
    ours, _ = apply(optclip.clip_by_global_norm(0.0), {"w": jnp.ones(3)})
    np.testing.assert_array_equal(np.asarray(ours["w"]), 0.0)


def test_differs_from_torch_no_epsilon():
    # torch.nn.utils.clip_grad_norm_ multiplies by max_norm / (total_norm + 1e-6);
    # optclip by max_norm / total_norm exactly, so the clipped norm equals max_norm.
    g = [jnp.array([3e-6, 4e-6])]
    ours, _ = apply(optclip.clip_by_global_norm(1e-6), g)
    np.testing.assert_allclose(float(optclip.global_norm(ours)), 1e-6, rtol=1e-6)
    # (torch's formula would give 5e-6 * 1e-6 / (5e-6 + 1e-6) = 8.3e-7 here)


@pytest.mark.parametrize("p", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.0, 1.0])
def test_derivative_of_update_at_zero_is_finite(p, max_norm):
    tx = optclip.clip_by_global_norm(max_norm, ord=p)
    jac = jax.jacfwd(lambda g: tx.update(g, tx.init(g))[0])(jnp.zeros(3))
    assert np.all(np.isfinite(np.asarray(jac)))
    grad = jax.grad(lambda g: jnp.sum(tx.update(g, tx.init(g))[0] ** 2))(jnp.zeros(3))
    assert np.all(np.isfinite(np.asarray(grad)))


def test_min_norm_lifts_small_but_keeps_zero():
    tx = optclip.clip_by_global_norm(10.0, min_norm=1.0)
    out, _ = apply(tx, jnp.array([0.03, 0.04]))
    np.testing.assert_allclose(np.asarray(out), [0.6, 0.8], rtol=1e-6)
    out, _ = apply(tx, jnp.zeros(2))
    np.testing.assert_array_equal(np.asarray(out), 0.0)


# --- leaves, dtypes, thresholds ---------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CLIPPERS))
def test_passes_through_none_int_float0(name):
    f0 = np.zeros((2,), dtype=jax.dtypes.float0)
    tree = {"w": jnp.array([30.0, 40.0], jnp.bfloat16), "i": jnp.arange(3), "n": None, "f0": f0}
    out, _ = jax.jit(lambda t: apply(CLIPPERS[name](1.0), t))(tree)
    assert out["n"] is None and out["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["i"]), [0, 1, 2])
    assert out["f0"].dtype == jax.dtypes.float0


def test_schedule_threshold_follows_count():
    tx = optclip.clip_by_global_norm(optax.linear_schedule(1.0, 3.0, 2))
    state = tx.init(None)
    seen = []
    for _ in range(4):
        _, state = tx.update(jnp.array([30.0, 40.0]), state)
        seen.append(float(state.stats.threshold))
    assert seen == [1.0, 2.0, 3.0, 3.0]


def test_jax_scalar_threshold():
    out, _ = apply(optclip.clip_by_global_norm(jnp.asarray(2.5)), jnp.array([3.0, 4.0]))
    np.testing.assert_allclose(np.asarray(out), [1.5, 2.0], rtol=1e-6)


@pytest.mark.parametrize("factory,kw", [
    (optclip.clip_by_global_norm, "max_norm"), (optclip.clip_by_leaf_norm, "max_norm"),
    (optclip.clip_by_block_rms, "threshold"), (optclip.clip_by_value, "max_value")])
def test_inject_hyperparams(factory, kw):
    tx = optax.inject_hyperparams(factory)(**{kw: 1.0})
    g = jnp.array([3.0, 4.0])
    step = jax.jit(tx.update)
    state = tx.init(g)
    out1, state = step(g, state)
    state.hyperparams[kw] = jnp.asarray(100.0)
    out2, state = step(g, state)
    measure = optclip.global_norm(out1) / (math.sqrt(2) if kw == "threshold" else 1)
    if kw == "max_value":
        measure = jnp.max(jnp.abs(out1))
    assert float(measure) <= 1.0 + 1e-6
    np.testing.assert_array_equal(np.asarray(out2), [3.0, 4.0])
    assert float(optclip.stats(state)["threshold"]) == 100.0


# --- non-finite -------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CLIPPERS))
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_nonfinite_is_flagged_not_hidden(name, bad):
    out, state = apply(CLIPPERS[name](1.0), {"a": jnp.array([1.0, bad]), "b": jnp.ones(2)})
    assert bool(state.stats.nonfinite)
    assert not np.all(np.isfinite(np.asarray(out["a"])))
    assert not math.isfinite(float(optclip.stats(state)["grad_norm"]))
    _, state = apply(CLIPPERS[name](1.0), {"a": jnp.array([1e30, 1e30]), "b": jnp.ones(2)})
    assert not bool(state.stats.nonfinite)


def test_error_if_nonfinite_raises_under_jit():
    tx = optclip.clip_by_global_norm(1.0, error_if_nonfinite=True)
    step = jax.jit(lambda g: apply(tx, g))
    jax.block_until_ready(step(jnp.ones(2)))
    with pytest.raises(Exception, match="NaN or inf"):
        jax.block_until_ready(step(jnp.array([1.0, jnp.nan])))


# --- validation -------------------------------------------------------------------------

@pytest.mark.parametrize("call,match", [
    (lambda: optclip.clip_by_global_norm(-1.0), "max_norm must be >= 0"),
    (lambda: optclip.clip_by_global_norm(float("nan")), "max_norm must be >= 0"),
    (lambda: optclip.clip_by_global_norm("1"), "max_norm must be a number"),
    (lambda: optclip.clip_by_global_norm(1.0, ord=0.5), "ord must be"),
    (lambda: optclip.clip_by_global_norm(1.0, ord="fro"), "ord must be"),
    (lambda: optclip.clip_by_global_norm(1.0, min_norm=2.0), "min_norm must be <= max_norm"),
    (lambda: optclip.clip_by_global_norm(1.0, min_norm=-1.0), "min_norm must be >= 0"),
    (lambda: optclip.clip_by_value(-1.0), "max_value must be >= 0"),
    (lambda: optclip.clip_by_value(1.0, 2.0), "min_value must be <= max_value"),
    (lambda: optclip.clip_by_value(1.0, float("nan")), "min_value must not be NaN"),
    (lambda: optclip.clip_by_leaf_norm(-0.1), "max_norm must be >= 0"),
    (lambda: optclip.clip_by_leaf_norm(1.0, ord=-2), "ord must be"),
    (lambda: optclip.clip_by_block_rms(float("nan")), "threshold must be >= 0"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- training -----------------------------------------------------------------------------

A = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
X_STAR = np.array([1.0, -2.0, 3.0, 0.5], np.float32)
B = A @ X_STAR


def loss(x):
    return 0.5 * jnp.mean((jnp.asarray(A) @ x - jnp.asarray(B)) ** 2)


OPTIMIZERS = {
    "sgd": (lambda: optax.sgd(0.1), 1500),
    "adam": (lambda: optax.adam(optax.exponential_decay(0.1, 300, 0.3)), 1500),
    "rmsprop": (lambda: optax.rmsprop(optax.exponential_decay(0.05, 300, 0.3)), 1500),
}


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("name", sorted(CLIPPERS))
def test_trains_least_squares_to_optimum(name, opt):
    make, steps = OPTIMIZERS[opt]
    tx = optax.chain(CLIPPERS[name](0.5), make())
    x0 = jnp.zeros(4)

    @jax.jit
    def run(x):
        def body(carry, _):
            x, s = carry
            u, s = tx.update(jax.grad(loss)(x), s, x)
            return (optax.apply_updates(x, u), s), None
        (x, s), _ = jax.lax.scan(body, (x, tx.init(x)), None, length=steps)
        return x, s

    x, state = run(x0)
    np.testing.assert_allclose(np.asarray(x), X_STAR, atol=2e-2)
    assert float(optclip.stats(state)["grad_norm"]) < 0.05


@pytest.mark.parametrize("jit", [False, True])
def test_clip_by_value_scale_stat_with_complex_and_real_leaves_and_bounds_excluding_zero(jit):
    # The norm after the clamp concatenated the small leaves raw before clamping them: a real
    # leaf beside a complex one was promoted to complex, and its imaginary zeros were clamped
    # into [0.1, 1] and counted (the clamp itself, leaf by leaf, was right).
    tree = {"c": jnp.array([1 + 1j, 0.05 - 2j], jnp.complex64),
            "r": jnp.array([0.5, 2.0, -3.0], jnp.float32)}
    tx = optclip.clip_by_value(1.0, min_value=0.1)
    update = jax.jit(tx.update) if jit else tx.update
    out, state = update(tree, tx.init(None))
    xs = [np.asarray(x).astype(np.complex128) for x in jax.tree.leaves(tree)]
    clamped = [np.clip(x.real, 0.1, 1.0) + 1j * np.clip(x.imag, 0.1, 1.0) if np.iscomplexobj(
        np.asarray(t)) else np.clip(x.real, 0.1, 1.0) for x, t in zip(xs, jax.tree.leaves(tree),
                                                                     strict=True)]
    for got, want in zip(jax.tree.leaves(out), clamped, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    before = math.sqrt(sum(np.sum(np.abs(x) ** 2) for x in xs))
    after = math.sqrt(sum(np.sum(np.abs(x) ** 2) for x in clamped))
    np.testing.assert_allclose(float(state.stats.scale), after / before, rtol=1e-5)
    np.testing.assert_allclose(float(state.stats.grad_norm), before, rtol=1e-6)


@pytest.mark.parametrize("two_sided", [False, True])
def test_clip_by_value_scale_stat_with_a_weak_float32_leaf_beside_a_bfloat16_one(two_sided):
    # the norm after the clamp concatenated the small leaves raw: a weak float32 (the gradient
    # of a Python float) was cast to bfloat16, and 1.001 counted as 1.0
    g = {"h": jnp.array([3.0, 0.5], jnp.bfloat16), "t": jnp.asarray(1.001)}
    tx = optclip.clip_by_value(1.5, min_value=-1.5 if two_sided else None)
    _, state = jax.jit(tx.update)(g, tx.init(None))
    before = math.sqrt(9 + 0.25 + 1.001 ** 2)
    after = math.sqrt(1.5 ** 2 + 0.25 + 1.001 ** 2)
    assert bool(state.stats.clipped)
    np.testing.assert_allclose(float(state.stats.scale), after / before, rtol=1e-6)


def test_clip_by_value_scale_stat_matches_float64_at_every_magnitude():
    # the norm after the clamp is taken divided by the bound, with no overflow rescue (the
    # terms are at most 1 and one is 1): exact from 1e-30 to 1e30, complex and bf16 leaves too
    rng = np.random.default_rng(0)
    step = jax.jit(lambda g, hi: optclip.clip_by_value(hi).update(g, optclip.clip_by_value(
        hi).init(None)))
    for scale in (1e-30, 1e-8, 1.0, 3e7, 1e30):
        hi = np.float32(scale * 0.7)
        tree = {"a": jnp.asarray(rng.normal(size=(70000,)) * scale, jnp.float32),
                "b": jnp.asarray(rng.normal(size=(5, 3)) * scale, jnp.float32),
                "c": jnp.asarray((rng.normal(size=4) + 1j * rng.normal(size=4)) * scale,
                                 jnp.complex64),
                "h": jnp.asarray(rng.normal(size=300) * min(scale, 1e30), jnp.bfloat16)}
        _, state = step(tree, jnp.float32(hi))
        xs = [np.asarray(x).astype(np.complex128) for x in jax.tree.leaves(tree)]
        b = float(hi)
        clamped = [np.clip(x.real, -b, b) + 1j * np.clip(x.imag, -b, b) for x in xs]
        before = math.sqrt(sum(np.sum(np.abs(x) ** 2) for x in xs))
        after = math.sqrt(sum(np.sum(np.abs(x) ** 2) for x in clamped))
        assert bool(state.stats.clipped)
        np.testing.assert_allclose(float(state.stats.scale), after / before, rtol=1e-5)
