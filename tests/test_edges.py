"""Run-time trust, for every clipper: donation, thresholds that go bad at run time, errors a
user can act on. Each test here failed on the code before the fix it pins."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import refs

import optclip
from bench.eager_probe import lowerings
from optclip import static

P = {"w": jnp.array([[0.5, -1.0], [2.0, 0.25]]), "b": jnp.array([0.1, -0.2])}
G = {"w": jnp.array([[3.0, -4.0], [1.0, 2.0]]), "b": jnp.array([5.0, -6.0])}

# every clipper, built with a threshold (a float here; the runtime tests pass arrays/schedules)
BUILD = {
    "clip_by_global_norm": lambda t: optclip.clip_by_global_norm(t),
    "clip_by_global_norm_min": lambda t: optclip.clip_by_global_norm(t, min_norm=0.0),
    "clip_by_value": lambda t: optclip.clip_by_value(t),
    "clip_by_leaf_norm": lambda t: optclip.clip_by_leaf_norm(t),
    "clip_by_block_rms": lambda t: optclip.clip_by_block_rms(t),
    "agc": lambda t: optclip.agc(t),
    "adagc": lambda t: optclip.adagc(lambda_abs=t, warmup_steps=5),
    "zclip": lambda t: optclip.zclip(max_norm=t),
    "clippy": lambda t: optclip.clippy(t, 0.0),
}
ALL = {
    **{k: (lambda b=b: b(1.0)) for k, b in BUILD.items()},
    "autoclip": lambda: optclip.autoclip(),
    "autoclip_window": lambda: optclip.autoclip(history=4),
    "skip_nonfinite": lambda: optclip.skip_nonfinite(optax.adam(1e-3)),
    "skip_on_spike": lambda: optclip.skip_on_spike(optax.adam(1e-3)),
}


# --- a fresh state can be donated ---------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ALL))
def test_fresh_state_can_be_donated(name):
    tx = optax.chain(ALL[name](), optax.sgd(0.1))

    def step(params, state, g):
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    params = jax.tree.map(jnp.copy, P)
    state = tx.init(params)
    ids = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)]
    assert len(ids) == len(set(ids)), "init holds one buffer twice"
    f = jax.jit(step, donate_argnums=(0, 1))
    params, state = f(params, state, G)  # "Attempt to donate the same buffer twice" before
    params, state = f(params, state, G)
    jax.block_until_ready(params)


def test_reset_peaks_state_can_be_donated():
    tx = optclip.clip_by_global_norm(1.0)
    _, state = tx.update(G, tx.init(P))
    state = optclip.reset_peaks(state)
    ids = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)]
    assert len(ids) == len(set(ids))


# --- an eager update compiles once ---------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ALL))
def test_eager_update_compiles_once(name):
    # Eagerly, JAX traced each lax.cond again at every call and compiled it again: 1 to 3
    # programs a step, 150-460 ms on XLA:CPU (python -m bench.eager_probe). Now the first call
    # runs op by op (a transformation built anew at every step is called once), the second
    # builds one compiled program of the whole update, and later calls reuse it.
    tx = ALL[name]()
    states, lowered = [tx.init(P)], []
    for _ in range(4):
        (_, state), names = lowerings(
            lambda s=states[-1]: jax.block_until_ready(tx.update(G, s, P)))
        states.append(state)
        lowered.append(names)
    whole = [[n for n in names if "update_fn" in n] for names in lowered]
    assert [len(w) for w in whole] == [0, 1, 0, 0], lowered
    assert [len(names) for names in lowered[2:]] == [0, 0]
    # a compiled call may hand an input's buffer back as an output: the state it returns must
    # still hold no buffer twice, or donating it fails
    ids = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(states[-1])]
    assert len(ids) == len(set(ids))
    with jax.disable_jit():  # op by op, the update as written
        want = tx.update(G, states[1], P)
    got = tx.update(G, states[1], P)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_a_transformation_rebuilt_every_step_is_not_compiled_every_step():
    # optax.inject_hyperparams builds its transformation anew at every step: compiling each
    # one's update would cost a compile at every step (3x the op-by-op step: found by review)
    tx = optax.inject_hyperparams(lambda learning_rate: optax.chain(
        optclip.clip_by_global_norm(1.0), optax.sgd(learning_rate)))(learning_rate=0.1)
    state, names = tx.init(P), []
    for _ in range(3):
        (u, state), lowered = lowerings(lambda s=state: tx.update(G, s, P))
        names += lowered
    assert names and not [n for n in names if "update_fn" in n], names
    np.testing.assert_allclose(float(optax.global_norm(u)), 0.1, rtol=1e-6)


@pytest.mark.parametrize("schedule", [
    lambda c: 1.0 if int(c) < 2 else 0.5,  # a Python `if` on the step count
    lambda c: 1.0 if f"{c:d}" < "2" else 0.5,  # the step count formatted
    lambda c: [1.0, 1.0, 0.5, 0.5][c],  # a list indexed by it
])
def test_an_update_that_needs_python_values_runs_as_written(schedule):
    # it cannot be traced: it runs op by op, as it did, with one warning, rather than raising
    tx = optclip.clip_by_global_norm(schedule)
    state = tx.init(P)
    norms, lowered = [], []
    for i in range(4):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            (u, state), names = lowerings(lambda s=state: tx.update(G, s, P))
        assert len(caught) == (i == 1), [str(w.message) for w in caught]
        lowered.append(names)
        norms.append(float(optax.global_norm(u)))
    np.testing.assert_allclose(norms, [1.0, 1.0, 0.5, 0.5], rtol=1e-6)
    assert not [n for names in lowered[2:] for n in names if "update_fn" in n]  # stays op by op


def test_a_callers_error_in_the_compiled_call_is_raised_not_hidden():
    tx = optclip.clip_by_global_norm(1.0)
    state = tx.init(P)
    _, state = tx.update(G, state, P)
    with pytest.raises(TypeError, match="update got state=None"):
        tx.update(G, None, P)  # the second call, which would compile: the caller's error
    _, state = tx.update(G, state, P)
    assert lowerings(lambda: tx.update(G, state, P))[1] == []  # and it still runs compiled


def test_numpy_and_integer_leaves_pass_through_untouched_eagerly():
    # jit would turn a NumPy int64 into int32 (2**40 into 0): such an update runs as written
    tx = optclip.clip_by_global_norm(1.0)
    g = {"w": jnp.array([3.0, 4.0]), "step": np.array([2**40], np.int64)}
    state = tx.init(g)
    for _ in range(3):
        u, state = tx.update(g, state)
        assert u["step"] is g["step"]
    np.testing.assert_allclose(np.asarray(u["w"]), [0.6, 0.8], rtol=1e-6)
    # JAX integer leaves take the compiled path, and keep their values
    g = {"w": jnp.array([3.0, 4.0]), "step": jnp.array([7, -3], jnp.int32)}
    for _ in range(3):
        u, state = tx.update(g, state)
        assert u["step"].dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(u["step"]), [7, -3])


NORMS = {"global_norm": lambda t: optclip.global_norm(t),
         "global_norm_inf": lambda t: optclip.global_norm(t, ord="inf"),
         "leaf_norms": lambda t: optclip.leaf_norms(t, 3.0),
         "unitwise_norm": lambda t: optclip.unitwise_norm(t["w"], axis=(0,))}


@pytest.mark.parametrize("name", sorted(NORMS))
def test_eager_norms_compile_once(name):
    # a norm logged at every step of an eager loop compiled its rescue's lax.cond at every call
    f = NORMS[name]
    got = f(G)
    assert [len(lowerings(lambda: jax.block_until_ready(f(G)))[1]) for _ in range(2)] == [0, 0]
    with jax.disable_jit():
        want = f(G)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_eager_norms_keep_their_arguments_apart():
    # ord=True equals ord=1 as a key: it is still refused, not served the 1-norm
    assert float(optclip.global_norm(G, 1)) == pytest.approx(21.0)
    with pytest.raises(ValueError, match="ord"):
        optclip.global_norm(G, True)
    with pytest.raises(ValueError, match="ord"):
        optclip.global_norm(G, jnp.asarray(2.0))
    np.testing.assert_allclose(float(optclip.global_norm(G, 2.0)), math.sqrt(91.0), rtol=1e-6)


# --- thresholds that go bad at run time ----------------------------------------------------------

def run_with(name, threshold, as_arg):
    """One update with the threshold passed as a traced jit argument (as_arg) or a schedule."""
    if as_arg:
        def f(t):
            tx = BUILD[name](t)
            return tx.update(G, tx.init(P), P)
        return jax.jit(f)(jnp.float32(threshold))
    tx = BUILD[name](lambda count: threshold + 0.0 * count)
    return jax.jit(tx.update)(G, tx.init(P), P)


def same_sign_or_zero(u, g):
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(g), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.all(np.isfinite(a))
        assert np.all(a * b >= 0), "the update changed sign"
        assert np.all(np.abs(a) <= np.abs(b) + 1e-6)


@pytest.mark.parametrize("as_arg", [True, False], ids=["array", "schedule"])
@pytest.mark.parametrize("bad", [-1.0, -0.01, math.nan], ids=["neg", "small_neg", "nan"])
@pytest.mark.parametrize("name", sorted(BUILD))
def test_bad_runtime_threshold_acts_as_zero_and_is_flagged(name, bad, as_arg):
    u, state = run_with(name, bad, as_arg)
    same_sign_or_zero(u, G)
    s = optclip.stats(state)
    assert bool(s["invalid_threshold"])
    # acts as 0: nothing gets through (a NaN threshold never lets an unclipped step through)
    for x in jax.tree.leaves(u):
        np.testing.assert_array_equal(np.asarray(x), 0.0)


@pytest.mark.parametrize("name", sorted(BUILD))
def test_valid_runtime_threshold_is_not_flagged(name):
    u, state = run_with(name, 0.5, True)
    assert not bool(optclip.stats(state)["invalid_threshold"])
    same_sign_or_zero(u, G)


def test_schedule_going_negative_never_flips_the_sign():
    # the schedule from the issue: 1 - c / 10 is negative after step 10
    tx = optax.chain(optclip.clip_by_global_norm(lambda c: 1.0 - c / 10), optax.sgd(1.0))
    state = tx.init(P)
    step = jax.jit(tx.update)
    for c in range(14):
        u, state = step(G, state, P)
        same_sign_or_zero(jax.tree.map(lambda x: -x, u), G)
        assert bool(optclip.stats(state)["invalid_threshold"]) == (c > 10)


def test_agc_negative_schedule_does_not_negate():
    tx = optclip.agc(lambda c: -0.01 + 0 * c)
    u, state = tx.update(G, tx.init(P), P)
    same_sign_or_zero(u, G)
    assert bool(state.stats.invalid_threshold)


def test_clip_by_value_runtime_bounds_out_of_order_act_as_zero():
    f = jax.jit(lambda lo, hi: optclip.clip_by_value(hi, lo).update(G, optclip.clip_by_value(
        hi, lo).init(P)))
    u, state = f(jnp.float32(1.0), jnp.float32(-1.0))
    same_sign_or_zero(u, G)
    assert bool(state.stats.invalid_threshold)
    u, state = f(jnp.float32(-1.0), jnp.float32(1.0))
    assert not bool(state.stats.invalid_threshold)
    np.testing.assert_array_equal(np.asarray(u["b"]), [1.0, -1.0])


def test_autoclip_runtime_percentile_out_of_range_is_clamped_and_flagged():
    for q, flagged in ((150.0, True), (math.nan, True), (50.0, False)):
        tx = optclip.autoclip(lambda c, q=q: q + 0 * c)
        u, state = tx.update(G, tx.init(P))
        assert bool(state.stats.invalid_threshold) == flagged
        same_sign_or_zero(u, G)


@pytest.mark.parametrize("value", [-1.0, math.nan])
@pytest.mark.parametrize("name", sorted(BUILD))
def test_concrete_jax_scalar_is_validated_at_construction(name, value):
    with pytest.raises(ValueError, match="must be"):
        BUILD[name](jnp.float32(value))


@pytest.mark.parametrize("name", sorted(BUILD))
def test_non_scalar_threshold_names_the_argument(name):
    arg = {"adagc": "lambda_abs", "zclip": "max_norm", "agc": "clipping",
           "clip_by_value": "max_value", "clip_by_block_rms": "threshold",
           "clippy": "lambda_rel"}.get(name, "max_norm")
    with pytest.raises(ValueError, match=f"{arg}.*scalar.*shape"):
        BUILD[name](jnp.array([1.0, 2.0]))


@pytest.mark.parametrize("name", sorted(BUILD))
def test_schedule_returning_non_scalar_names_the_argument(name):
    tx = BUILD[name](lambda c: jnp.ones(2))
    with pytest.raises(ValueError, match="schedule.*scalar.*shape"):
        tx.update(G, tx.init(P), P)


# --- errors a user can act on -------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ALL))
def test_update_without_state_is_a_clear_error(name):
    with pytest.raises(TypeError, match="state=None.*init"):
        ALL[name]().update(G, None, P)


def test_state_of_another_clipper_is_a_clear_error():
    other = optclip.zclip().init(P)
    with pytest.raises(TypeError, match="optclip.zclip.*as its state"):
        optclip.clip_by_global_norm(1.0).update(G, other, P)


def test_agc_params_of_other_shapes_is_a_clear_error():
    tx = optclip.agc()
    bad = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"\['w'\].*\(2, 2\).*\(3, 2\)"):
        tx.update(G, tx.init(bad), bad)
    with pytest.raises(ValueError, match="structure"):
        tx.update(G, tx.init(P), {"w": P["w"]})


@pytest.mark.parametrize("thing", [None, optax.adam, optax.adam(1e-3), 3.0])
def test_stats_of_something_that_is_no_state_raises(thing):
    with pytest.raises(TypeError, match="optimizer \\*state\\*"):
        optclip.stats(thing)


def test_error_if_nonfinite_exception_types():
    tx = optclip.clip_by_global_norm(1.0, error_if_nonfinite=True)
    bad = {"w": jnp.array([jnp.nan])}
    with pytest.raises(FloatingPointError, match="NaN or inf"):  # eager
        tx.update(bad, tx.init(None))
    with pytest.raises(jax.errors.JaxRuntimeError, match="FloatingPointError"):  # under jit
        out = jax.jit(tx.update)(bad, tx.init(None))
        jax.block_until_ready(out)
    # a lift whose factor overflows float32 gives finite outputs, so nothing to raise
    tx = optclip.clip_by_global_norm(3e38, min_norm=3e38, error_if_nonfinite=True)
    u, _ = tx.update({"w": jnp.array([1e-30, 0.0])}, tx.init(None))
    np.testing.assert_allclose(np.asarray(u["w"]), [3e38, 0.0], rtol=1e-6)


def test_min_norm_lift_does_not_overflow():
    # the case: 1e20 / 1e-20 overflows float32, and [1e-20, 0] became [inf, nan]
    tx = optclip.clip_by_global_norm(1e30, min_norm=1e20)
    u, state = tx.update({"w": jnp.array([1e-20, 0.0])}, tx.init(None))
    np.testing.assert_allclose(np.asarray(u["w"]), [1e20, 0.0], rtol=1e-6)
    assert not bool(state.stats.nonfinite)


def test_zero_threshold_zero_gradient_has_zero_derivative():
    # with max_norm = 0 the map is identically 0, so its derivative is 0 (it was the identity)
    tx = optclip.clip_by_global_norm(0.0)
    jac = jax.jacobian(lambda x: tx.update(x, tx.init(None))[0])(jnp.zeros(3))
    np.testing.assert_array_equal(np.asarray(jac), 0.0)
    jac = jax.jacobian(lambda x: tx.update(x, tx.init(None))[0])(jnp.array([1.0, 2.0, 2.0]))
    np.testing.assert_array_equal(np.asarray(jac), 0.0)


def test_zclip_clip_factor_zero_is_rejected():
    with pytest.raises(ValueError, match="clip_factor must be > 0"):
        optclip.zclip(clip_factor=0.0)


def test_clip_by_value_reports_a_clamp_beside_a_nan():
    tx = optclip.clip_by_value(1.0)
    u, state = tx.update({"w": jnp.array([jnp.nan, 5.0, 0.5])}, tx.init(None))
    assert bool(state.stats.clipped) and bool(state.stats.nonfinite)
    np.testing.assert_array_equal(np.asarray(u["w"])[1:], [1.0, 0.5])
    assert np.isnan(np.asarray(u["w"])[0])  # passed through, visible


def test_agc_axis_under_inject_hyperparams_needs_static_args():
    tx = optax.inject_hyperparams(optclip.agc, static_args=("axis",))(clipping=0.01, axis=0)
    u, state = jax.jit(tx.update)(G, tx.init(P), P)
    ref, _ = optclip.agc(0.01, axis=0).update(G, optclip.agc(0.01, axis=0).init(P), P)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


# --- NaN in leaves large enough that XLA:CPU's max reduction drops it ----------------------------
# On XLA:CPU (jax 0.10.2), jnp.max of a float32 array of 4,096 elements or more can return the
# largest finite element and drop a NaN (openxla/xla#21461). No clipper may rely on a max to see
# a NaN: the flags come from sums. These leaves are above both that size and norms.SMALL_LEAF,
# so that they are reduced on their own rather than concatenated with the small ones.

_BIG = 2 * 65536 + 37  # does not divide into the non-finite step's slices evenly
_W = -(-_BIG // static._ANY_CHUNKS)  # their width


def _big_tree(bad, pos):
    x = np.linspace(-0.5, 0.5, _BIG, dtype=np.float32)
    x[pos] = bad
    return {"w": jnp.asarray(x.reshape(1, _BIG)), "b": jnp.full((3,), 0.25, jnp.float32)}


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("name", sorted(ALL))
def test_nonfinite_in_a_large_leaf_is_flagged(name, bad):
    tx = ALL[name]()
    p = jax.tree.map(jnp.ones_like, _big_tree(0.0, 0))
    step = jax.jit(tx.update)
    for pos in (0, _BIG // 2, _BIG - 1):
        g = _big_tree(bad, pos)
        u, s = step(g, tx.init(p), p)
        st = optclip.stats(s)
        if "skipped" in st:
            assert bool(st["skipped"]), pos
            assert all(not np.any(np.asarray(v)) for v in jax.tree.leaves(u)), pos
        else:
            assert bool(st["nonfinite"]) and not math.isfinite(float(st["grad_norm"])), pos


_CLAMP_AT = sorted({0, _W - 1, _W, _BIG // 2, _BIG - _W - 1, _BIG - _W + 1, _BIG - 1})


@pytest.mark.parametrize("lo", [None, -0.75], ids=["symmetric", "bounds"])
def test_clip_by_value_reports_a_clamp_beside_a_nan_anywhere_in_a_large_leaf(lo):
    # the clamp flag on a non-finite step is taken slice by slice (static._chunked_any): a
    # clamp in any slice, the last one (which overlaps the one before it) included, is seen
    tx = optclip.clip_by_value(0.75, lo)
    step = jax.jit(tx.update)
    nan_at = 7
    for at in [None, *_CLAMP_AT]:
        g = _big_tree(math.nan, nan_at)
        if at is not None:
            g["w"] = g["w"].at[0, at if at != nan_at else at + 1].set(-3.0 if lo is None else 2.0)
        u, s = step(g, tx.init(None))
        assert bool(s.stats.nonfinite)
        assert bool(s.stats.clipped) == (at is not None), at
        assert np.isnan(np.asarray(u["w"])[0, nan_at])
    g = _big_tree(math.nan, nan_at)
    g["b"] = g["b"].at[1].set(9.0)  # a clamp in the small leaves only
    _, s = step(g, tx.init(None))
    assert bool(s.stats.clipped)


@pytest.mark.parametrize("ord_", [1, 2, 3, math.inf], ids=["l1", "l2", "l3", "linf"])
def test_norms_of_a_large_leaf_with_a_nan_are_nan(ord_):
    f = jax.jit(lambda g: (optclip.global_norm(g, ord=ord_), optclip.leaf_norms(g, ord=ord_)))
    for pos in (0, _BIG // 2, _BIG - 1):
        total, per_leaf = f(_big_tree(math.nan, pos))
        assert np.isnan(float(total)) and np.isnan(float(per_leaf["w"])), pos
        assert float(per_leaf["b"]) > 0


# --- clip_by_value's stats at the edges of its own arithmetic (from an adversarial review) -----

def test_clip_by_value_subnormal_bound_gives_a_finite_scale():
    # A subnormal bound passes `hi > 0` at compile time but is taken as 0 at run time on CPU:
    # divided by it, the norm after the clamp was 0/0 = NaN. (A GPU keeps the subnormal.)
    tx = optclip.clip_by_value(1e-40)
    u, s = jax.jit(tx.update)({"a": jnp.array([1.0, 2.0])}, tx.init(None))
    assert math.isfinite(float(s.stats.scale)) and float(s.stats.scale) < 1e-30
    kept = np.float32(0.0 if jax.default_backend() == "cpu" else 1e-40)
    np.testing.assert_array_equal(np.asarray(u["a"]), [kept, kept])


def test_clip_by_value_traces_a_leaf_of_more_than_2_31_elements():
    # the non-finite step's slices take int32 offsets; a larger leaf is reduced whole
    tx = optclip.clip_by_value(0.5)
    g = {"w": jax.ShapeDtypeStruct((3_000_000_000,), jnp.bfloat16)}
    _, s = jax.eval_shape(tx.update, g, tx.init(None))
    assert s.stats.clipped.shape == ()


def test_clip_by_value_derivatives_at_the_bounds_match_optax():
    # optax.clip's clamp is a max and a min (jnp.clip), whose derivatives split a tie between
    # the two operands. 339d8aa's lax.clamp gave an element at a bound derivative 0, and with
    # both bounds one value lost the bound's own derivative (review, helper-47; reverted,
    # bench/results/cpu_value_clamp/).
    x = jnp.array([-5.0, -1.0, 0.3, 1.0, 5.0, 0.0, -0.0])

    def ours(u, lo, hi):
        tx = optclip.clip_by_value(hi, lo)
        return tx.update({"a": u}, tx.init(None))[0]["a"]

    def theirs(u, lo, hi):  # optax.clip's clamp, two-sided (it takes one bound, +-max_delta)
        return jnp.clip(u, lo, hi)

    xs = np.asarray(x)
    for lo, hi in ((-1.0, 1.0), (1.0, 1.0), (0.0, 0.0), (-1.0, 0.3)):
        args = (x, jnp.float32(lo), jnp.float32(hi))
        d = [np.asarray(jax.jacfwd(ours, argnum)(*args)) for argnum in (0, 1, 2)]
        for argnum in (0, 1, 2):
            np.testing.assert_array_equal(d[argnum], np.asarray(jax.jacfwd(theirs, argnum)(*args)),
                                          err_msg=f"{lo, hi, argnum}")
        # from the formula, away from the bounds: 1 in x inside, 1 in the bound it is clamped to
        inside, below, above = (lo < xs) & (xs < hi), xs < lo, xs > hi
        np.testing.assert_array_equal(np.diag(d[0])[inside | below | above], inside[
            inside | below | above].astype(np.float32))
        if lo < hi:
            np.testing.assert_array_equal(d[1][below], 1.0)
            np.testing.assert_array_equal(d[2][above], 1.0)
        else:  # the output is the bound, whatever x (off it): its derivative in it is 1
            np.testing.assert_array_equal((d[1] + d[2])[xs != lo], 1.0)
    # and through optax.clip itself, one-sided
    tx_o = optax.clip(1.0)
    jvp_o = jax.jvp(lambda u: tx_o.update(u, tx_o.init(None))[0], (x,), (jnp.ones(7),))[1]
    jvp_ours = jax.jvp(lambda u: ours(u, None, 1.0), (x,), (jnp.ones(7),))[1]
    np.testing.assert_array_equal(np.asarray(jvp_ours), np.asarray(jvp_o))


@pytest.mark.parametrize("h,gscale", [(1e-20, 1.0), (1.0, 1.0), (1e20, 1e20)])
def test_clip_by_value_scale_gradient_in_the_bound(h, gscale):
    # d(scale)/d(max_value), against the closed form: scale = sqrt(sum min(|g|, h)^2) / |g|
    g = np.array([3.0, -4.0, 0.5]) * gscale

    def scale(hv):
        tx = optclip.clip_by_value(hv)
        return tx.update({"a": jnp.asarray(g, jnp.float32)}, tx.init(None))[1].stats.scale

    m = np.minimum(np.abs(g), h)
    want = np.sum(m * (np.abs(g) > h)) / np.sqrt(np.sum(m**2)) / np.linalg.norm(g)
    np.testing.assert_allclose(float(jax.grad(scale)(jnp.float32(h))), want, rtol=1e-5)


def test_clip_by_value_slices_only_on_cpu():
    # the non-finite step's sliced loop is for XLA:CPU's boolean reductions; on GPU and TPU
    # a slice at a traced offset along a sharded dimension would gather the whole leaf
    from jax import export
    tx = optclip.clip_by_value(0.5)
    g = {"w": jax.ShapeDtypeStruct((300, 700), jnp.float32)}
    for platform, loops in (("cpu", 1), ("cuda", 0), ("tpu", 0)):
        text = export.export(jax.jit(tx.update), platforms=[platform])(
            g, tx.init(None)).mlir_module()
        assert text.count("stablehlo.while") == loops, platform


# --- a clip factor below float32's smallest normal ----------------------------------------------

# Norms of 1e37 to 2e38 against thresholds of 1 or less: the factor max_norm / norm is about
# 1e-38 to 1e-40, below float32's smallest normal (1.2e-38), which XLA flushes to 0 on CPU.
# The clipped update is O(max_norm) all the same, so it must not be zeroed.
_HUGE = {
    "w": np.array([[1e38, -5e37], [2e37, 1e37]], np.float32),
    "h": np.array([1e38, -3e37, 1.0], jnp.bfloat16),
    "b": np.array([1.0, -2.0], np.float32),
}
_HUGE_P = {"w": np.array([[0.5, -1.0], [2.0, 0.25]], np.float32),
           "h": np.ones(3, jnp.bfloat16), "b": np.array([0.1, -0.2], np.float32)}


def _global_ref(g, p, t=1.0):
    return dict(zip(g, refs.global_clip(refs.np_leaves(g.values()), t)[0], strict=True))


# The global clippers. The per-leaf and unit-wise ones apply one factor per leaf or unit, and
# such a factor still flushes (README, Limits; static.clip_factors says why).
_TINY_FACTOR = {
    # name: (the clipper, steps of a normal gradient before the huge one, the float64 reference)
    "clip_by_global_norm": (lambda: optclip.clip_by_global_norm(1.0), 0, _global_ref),
    "clip_by_global_norm_min": (lambda: optclip.clip_by_global_norm(1.0, min_norm=0.5), 0,
                                _global_ref),
    "clip_by_global_norm_l1": (
        lambda: optclip.clip_by_global_norm(1.0, ord=1), 0,
        lambda g, p: dict(zip(g, refs.global_clip(refs.np_leaves(g.values()), 1.0, 1.0)[0],
                              strict=True))),
    "zclip": (lambda: optclip.zclip(max_norm=1.0), 0, _global_ref),
    # the 0th percentile of the norms seen: the normal step's norm, 1
    "autoclip": (lambda: optclip.autoclip(percentile=0.0, history=4), 1, _global_ref),
    # factors of about 1e-58, below 2^-190: 2^64 times the factor is still subnormal
    "clip_by_global_norm_1e-20": (lambda: optclip.clip_by_global_norm(1e-20), 0,
                                  lambda g, p: _global_ref(g, p, 1e-20)),
}


@pytest.mark.parametrize("name", sorted(_TINY_FACTOR))
def test_a_clip_factor_below_the_smallest_normal_float_is_not_flushed_to_zero(name):
    make, warm, ref = _TINY_FACTOR[name]
    tx = make()
    g = jax.tree.map(jnp.asarray, _HUGE)
    p = jax.tree.map(jnp.asarray, _HUGE_P)
    step = jax.jit(tx.update)
    state = tx.init(p)
    unit = {"w": jnp.array([[0.6, 0.0], [0.0, 0.0]]), "h": jnp.zeros(3, jnp.bfloat16),
            "b": jnp.array([0.0, 0.8])}  # norm 1
    for _ in range(warm):
        _, state = step(unit, state, p)
    u, state = step(g, state, p)
    want = ref(_HUGE, _HUGE_P)
    for k in g:
        got = np.asarray(u[k], np.float64)
        assert u[k].dtype == g[k].dtype
        # bf16 keeps 8 bits; a true value below float32's smallest normal may read as 0
        rtol = 1e-2 if g[k].dtype == jnp.bfloat16 else 1e-5
        np.testing.assert_allclose(got, want[k], rtol=rtol, atol=2e-38, err_msg=k)
        assert np.abs(got).max() > 0 or np.abs(want[k]).max() < 2e-38, k
    st = optclip.stats(state)
    assert not bool(st["nonfinite"]) and math.isfinite(float(st["grad_norm"]))
    assert math.isfinite(float(st["scale"]))


def test_adagc_state_after_a_norm_of_1e38_still_lets_normal_steps_through():
    # the norm after the clip feeds gamma: taken as h * norm, it was 0 at a norm of 1e38, gamma
    # became 0 in the warm-up (a minimum) and every later step was zeroed. (That step's own
    # update, one factor of 1e-38 per tensor, is flushed to 0 on CPU: README, Limits.)
    tx = optclip.adagc(warmup_steps=2, lambda_abs=1.0)
    small = {"w": jnp.array([0.6, 0.8])}
    big = {"w": jnp.array([6e37, 8e37])}
    step = jax.jit(tx.update)
    state = tx.init(small)
    outs = []
    for g in (small, big, small, small):
        u, state = step(g, state)
        outs.append(np.asarray(u["w"]))
    for u in outs[:1] + outs[2:]:
        np.testing.assert_allclose(u, [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.gamma), 1.0, rtol=1e-2)


def test_a_norm_beyond_float32s_range_zeroes_the_update_and_skip_nonfinite_skips_it():
    # README, Limits: the norm of four elements of 3e38 (6e38) is inf in float32, the factor
    # max_norm / inf is 0, and the guard reads the inf norm as a step to skip
    g = {"a": jnp.full((4,), 3e38, jnp.float32)}
    for tx in (optclip.clip_by_global_norm(1.0), optclip.clip_by_leaf_norm(1.0),
               optclip.adagc(warmup_steps=1), optclip.agc(0.01)):
        p = {"a": jnp.ones((4,), jnp.float32)}
        u, s = jax.jit(tx.update)(g, tx.init(p), p)
        st = optclip.stats(s)
        assert not np.any(np.asarray(u["a"])) and math.isinf(float(st["grad_norm"]))
        # agc reads its flag off the unit norms: a unit norm that overflows counts as non-finite
        assert bool(st["clipped"]) and bool(st["nonfinite"]) == isinstance(s, optclip.AGCState)
        assert float(st["scale"]) == 0.0  # not NaN (inf * 0)
        if hasattr(s, "gamma"):  # adagc: nothing learnt from a norm it cannot represent
            assert np.all(np.isinf(np.asarray(s.gamma)))
    tx = optclip.skip_nonfinite(optax.sgd(1.0))
    u, s = jax.jit(tx.update)(g, tx.init(g), g)
    assert bool(optclip.stats(s)["skipped"]) and not np.any(np.asarray(u["a"]))


# A tree known at compile time (built inside the jitted function, as in tests and toy code):
# XLA's simplifier regrouped the rescue's (x * c) * (x * c) as (c * c) * (x * x), a subnormal
# flushed to 0 times inf (x = 1e20), or inf times 0 (x = 1e-30): NaN where the true norm is
# finite, and every clipper built on it passed the update through unclipped, zeroed it, or
# skipped the step. The tree has a scalar, a (2,) and a (1, 4) leaf too: a unit of one
# element has a scale that XLA folds to a constant as well (agc's units of a (1, out) kernel).
def _const_tree(scale, n):
    r = np.random.default_rng(n)
    t = {f"a{i}": (r.standard_normal((4, 3)) * scale).astype(np.float32) for i in range(n)}
    t["b"] = (r.standard_normal(5) * scale).astype(np.float32)
    t["c"] = np.float32(r.standard_normal() * scale)
    t["d"] = (r.standard_normal(2) * scale).astype(np.float32)
    t["k"] = (r.standard_normal((1, 4)) * scale).astype(np.float32)
    return t


def _first_update(tx, g):
    """The first update of ``g``, with params of ones of its shapes (agc, the guard's sgd)."""
    w = jax.tree.map(jnp.ones_like, g)
    return tx.update(g, tx.init(w), w)[0]


_CONST = {
    "global_norm": (lambda g: optclip.global_norm(g),
                    lambda g: refs.pnorm(refs.np_leaves(g.values()), 2.0)),
    "leaf_norms": (lambda g: optclip.leaf_norms(g),
                   lambda g: {k: refs.pnorm([np.float64(v)], 2.0) for k, v in g.items()}),
    "clip_by_global_norm": (lambda g: _first_update(optclip.clip_by_global_norm(1.0), g),
                            lambda g: _global_ref(g, None)),
    "clip_by_leaf_norm": (
        lambda g: _first_update(optclip.clip_by_leaf_norm(1.0), g),
        lambda g: dict(zip(g, refs.leaf_clip(refs.np_leaves(g.values()), 1.0), strict=True))),
    "agc": (lambda g: _first_update(optclip.agc(0.01), g), lambda g: {
        # agc's units: a 2-D kernel's fan-in (axis 0); a vector or scalar is one unit
        k: refs.agc_clip(np.float64(v), np.ones(np.shape(v)), 0.01, 1e-3,
                         (0,) if np.ndim(v) > 1 else None)
        for k, v in g.items()}),
    # sgd(1) under the guard: the update is -g unless the step is skipped
    "skip_nonfinite": (lambda g: _first_update(optclip.skip_nonfinite(optax.sgd(1.0)), g),
                       lambda g: {k: -np.float64(v) for k, v in g.items()}),
}


@pytest.mark.parametrize("scale", [1e20, 1e-30])
@pytest.mark.parametrize("name", sorted(_CONST))
def test_a_tree_known_at_compile_time_gives_its_true_norm_not_nan(name, scale):
    fn, ref = _CONST[name]
    g = _const_tree(scale, 12)  # 12 leaves of one shape: the stacked path, and some alone
    got = jax.jit(lambda: fn(jax.tree.map(jnp.asarray, g)))()
    want = ref(g)
    for k in (got if isinstance(got, dict) else [None]):
        a = np.asarray(got if k is None else got[k], np.float64)
        w = np.asarray(want if k is None else want[k], np.float64)
        assert np.all(np.isfinite(a)), k
        np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-44, err_msg=str(k))
