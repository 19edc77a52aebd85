"""Clippy (update-space clipping) against a NumPy reference, and update clipping in general.

The reference below is written from the paper's formula (Tang et al. 2023):
each tensor's update u is scaled by sigma = min(1, min_j (l_rel |w_j| + l_abs) / |u_j|),
with the edge cases of TensorFlow Recommenders' ClippyAdagrad: a zero u_j sets no bound.
"""

import math
import re
import sys

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from refs import clippy_sigma as np_sigma

import optclip

# --- NumPy references ---------------------------------------------------------------------------


def np_clippy(updates, params, lam_rel, lam_abs):
    """{key: (clipped update, sigma)} in float64."""
    return {k: (np.asarray(updates[k], np.float64) * s, s)
            for k in updates
            for s in [np_sigma(updates[k], params[k], lam_rel, lam_abs)]}


def random_tree(seed, dtype=jnp.float32, zero_frac=0.2):
    """Updates and params of several shapes, mixed signs, with zero weights and zero updates
    sprinkled in, one all-zero update leaf, and one all-zero weight leaf."""
    rng = np.random.default_rng(seed)
    shapes = {"scalar": (), "bias": (3,), "kernel": (4, 3), "conv": (2, 2, 3), "dead": (5,),
              "fresh": (2, 2)}
    u, w = {}, {}
    for k, s in shapes.items():
        uu = rng.normal(size=s) * 10.0 ** rng.uniform(-3, 0, size=s)
        ww = rng.normal(size=s) * 10.0 ** rng.uniform(-2, 1, size=s)
        uu = np.where(rng.uniform(size=s) < zero_frac, 0.0, uu)
        ww = np.where(rng.uniform(size=s) < zero_frac, 0.0, ww)
        if k == "dead":
            uu = np.zeros(s)
        if k == "fresh":
            ww = np.zeros(s)
        u[k] = jnp.asarray(uu, dtype)
        w[k] = jnp.asarray(ww, dtype)
    return u, w


def check_against_reference(out, u, w, lam_rel, lam_abs, rtol, atol=0.0):
    want = np_clippy(u, w, lam_rel, lam_abs)
    for k in u:
        assert out[k].dtype == u[k].dtype, k
        assert out[k].shape == u[k].shape, k
        np.testing.assert_allclose(np.asarray(out[k], np.float64), want[k][0], rtol=rtol,
                                   atol=atol, err_msg=k)
        # the promise itself: no coordinate moves by more than its bound
        bound = lam_rel * np.abs(np.asarray(w[k], np.float64)) + lam_abs
        assert np.all(np.abs(np.asarray(out[k], np.float64)) <= bound * (1 + rtol) + atol), k
    return want


# --- the reference, on random trees, eager and under jit ----------------------------------------


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("lam_rel,lam_abs", [(0.1, 1e-7), (0.01, 0.0), (0.5, 1e-3)])
def test_matches_numpy_reference(lam_rel, lam_abs, jit):
    tx = optclip.clippy(lam_rel, lam_abs)
    update = jax.jit(tx.update) if jit else tx.update
    n_clipped = 0
    for seed in range(4):
        u, w = random_tree(seed)
        out, state = update(u, tx.init(w), w)
        want = check_against_reference(out, u, w, lam_rel, lam_abs, rtol=2e-6)
        n_clipped += sum(s < 1 for _, s in want.values())
        assert bool(state.stats.clipped) == any(s < 1 for _, s in want.values())
    assert n_clipped > 0  # the comparison is not vacuous


def test_edge_cases_as_the_reference():
    tx = optclip.clippy(lambda_rel=0.1, lambda_abs=0.0)
    w = {"zero_w": jnp.array([0.0, 1.0]), "zero_u": jnp.array([1.0, 2.0]),
         "all_zero": jnp.zeros(3), "zero_w_zero_u": jnp.array([0.0, 5.0])}
    u = {"zero_w": jnp.array([1e-6, 0.0]),       # a zero weight allows no move: sigma = 0
         "zero_u": jnp.array([0.0, 0.1]),        # a zero update sets no bound
         "all_zero": jnp.zeros(3),               # 0 / 0: sigma = 1, no NaN
         "zero_w_zero_u": jnp.array([0.0, 0.1])}  # zero weight, but it does not move
    out, state = tx.update(u, tx.init(w), w)
    np.testing.assert_array_equal(out["zero_w"], [0.0, 0.0])
    np.testing.assert_array_equal(out["zero_u"], u["zero_u"])
    np.testing.assert_array_equal(out["all_zero"], [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(out["zero_w_zero_u"], u["zero_w_zero_u"])
    assert bool(state.stats.clipped) and not bool(state.stats.nonfinite)
    # with lambda_abs > 0 a zero weight may move by lambda_abs
    out, _ = optclip.clippy(0.1, 1e-3).update(u, tx.init(w), w)
    np.testing.assert_allclose(out["zero_w"], [1e-6, 0.0])
    out, _ = optclip.clippy(0.1, 1e-7).update({"a": jnp.array([1e-6])}, tx.init(w),
                                               {"a": jnp.array([0.0])})
    np.testing.assert_allclose(out["a"], [1e-7], rtol=1e-6)
    # an infinite fraction of a zero weight is 0, not NaN
    out, _ = optclip.clippy(math.inf, 1e-3).update(u, tx.init(w), w)
    np.testing.assert_allclose(out["zero_w"], [1e-6, 0.0])
    assert all(np.isfinite(np.asarray(x)).all() for x in out.values())


def test_derivative_at_zero_update_is_finite():
    w = {"a": jnp.array([0.0, 1.0, 2.0])}
    tx = optclip.clippy(0.1, 0.0)

    def f(x):
        return jnp.sum(tx.update({"a": x}, tx.init(w), w)[0]["a"])

    g = jax.grad(f)(jnp.zeros(3))
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(g, [1.0, 1.0, 1.0])


def test_derivative_through_grouped_small_tensors_matches_finite_differences():
    # several small tensors take their factors from one stack's row minima: the derivative of each
    # factor reaches its own tensor's arg-min element only
    w = {"a": jnp.array([0.5, 1.0, 2.0]), "b": jnp.array([1.0, 0.3]),
         "c": jnp.array([3.0, 0.5, 0.2, 1.0])}
    tx = optclip.clippy(0.1, 1e-3)

    def f(x):
        out, _ = tx.update({"a": x[:3], "b": x[3:5], "c": x[5:]}, tx.init(w), w)
        return sum(jnp.sum(v * jnp.arange(1.0, v.size + 1)) for v in out.values())

    x = jnp.array([0.3, 0.05, 0.02, 0.01, 0.2, 0.02, 0.5, 0.01, 0.3])
    g = np.asarray(jax.jit(jax.grad(f))(x))
    eps, fj = 1e-3, jax.jit(f)
    fd = [(fj(x.at[i].add(eps)) - fj(x.at[i].add(-eps))) / (2 * eps) for i in range(9)]
    np.testing.assert_allclose(g, fd, rtol=2e-2, atol=1e-3)
    assert (g != 1.0).sum() >= 3  # factors below 1 in each tensor: not the identity


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_keeps_dtype_and_computes_in_float32(dtype):
    u, w = random_tree(7, dtype)
    tx = optclip.clippy(0.05, 1e-4)
    out, _ = tx.update(u, tx.init(w), w)
    rtol = 2 * float(jnp.finfo(dtype).eps)
    # below the smallest normal, the output's own rounding is absolute: half a subnormal step
    atol = float(jnp.finfo(dtype).smallest_subnormal)
    check_against_reference(out, u, w, 0.05, 1e-4, rtol=rtol, atol=atol)
    # a huge update against a tiny bound: the factor (1.7e-9) underflows to 0 in fp16, but not
    # in float32, where it is computed: the weight still moves by its bound
    big = {"a": jnp.array([60000.0, -30000.0], dtype)}
    wsmall = {"a": jnp.array([1e-3, 1.0], dtype)}
    out, _ = optclip.clippy(0.1, 0.0).update(big, tx.init(wsmall), wsmall)
    assert out["a"].dtype == dtype
    sigma = 0.1 * float(wsmall["a"][0]) / 60000.0
    np.testing.assert_allclose(np.asarray(out["a"], np.float64),
                               np.array([60000.0, -30000.0]) * sigma, rtol=rtol)


def test_none_integer_and_float0_pass_through():
    tx = optclip.clippy(0.1, 0.0)
    f0 = np.zeros((2,), jax.dtypes.float0)
    u = {"n": None, "i": jnp.arange(3), "f0": f0, "x": jnp.array([1.0])}
    w = {"n": jnp.ones(2), "i": jnp.arange(3), "f0": jnp.ones(2), "x": jnp.array([1.0])}
    out, _ = tx.update(u, tx.init(w), w)
    assert out["n"] is None
    assert out["i"] is u["i"]
    assert out["f0"] is f0
    np.testing.assert_allclose(out["x"], [0.1])


def test_nonfinite_is_flagged_and_stays_visible():
    tx = optclip.clippy(0.1, 0.0)
    w = {"a": jnp.array([1.0, 1.0, 1.0]), "b": jnp.array([1.0, 1.0])}
    w["c"] = jnp.array([0.0, 1.0])
    u = {"a": jnp.array([jnp.nan, -jnp.inf, 0.5]), "b": jnp.array([0.2, 0.0]),
         "c": jnp.array([1.0, jnp.inf])}  # c: a zero weight gives sigma = 0
    out, state = jax.jit(tx.update)(u, tx.init(w), w)
    a = np.asarray(out["a"])
    assert np.isnan(a[0]) and a[1] == -np.inf        # not turned into plausible values
    np.testing.assert_allclose(a[2], 0.1, rtol=1e-6)  # sigma over the finite elements
    np.testing.assert_allclose(out["b"], [0.1, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(out["c"], [0.0, np.inf])  # inf stays inf, not 0 * inf
    assert bool(state.stats.nonfinite) and int(state.stats.nonfinite_count) == 1
    _, state = tx.update({"a": jnp.ones(3), "b": jnp.ones(2), "c": jnp.ones(2)}, state, w)
    assert not bool(state.stats.nonfinite)


@pytest.mark.parametrize("size", [3, 4096], ids=["small", "large"])
def test_nan_weight_makes_its_tensors_factor_nan(size):
    # As the docstring says: a NaN weight whose coordinate moves makes the tensor's factor,
    # and so its update, NaN; other tensors and a NaN weight that does not move are kept.
    # On XLA:CPU the min over a few thousand elements (YNNPACK's) does not propagate the
    # NaN: it returned a finite factor (0.2 here) before the NaN was read on its own.
    tx = optclip.clippy(0.1, 0.0)
    w = {"a": jnp.ones(size).at[size // 2].set(jnp.nan), "b": jnp.ones(size),
         "still": jnp.ones(size).at[1].set(jnp.nan)}
    u = {"a": jnp.full(size, 0.5), "b": jnp.full(size, 0.5),
         "still": jnp.full(size, 0.5).at[1].set(0.0)}
    for update in (tx.update, jax.jit(tx.update)):
        out, _ = update(u, tx.init(w), w)
        assert np.isnan(np.asarray(out["a"])).all()
        np.testing.assert_allclose(out["b"], 0.1, rtol=1e-6)
        np.testing.assert_allclose(np.delete(np.asarray(out["still"]), 1), 0.1, rtol=1e-6)
        assert float(out["still"][1]) == 0.0


def test_small_tensors_grouped_match_the_reference_with_mixed_dtypes_and_nonfinite():
    # Small tensors are stacked as rows by dtype (those of one size as they are, the others
    # zero-padded to a power-of-two width) and each stack reduced along its rows; large ones
    # on their own. Each tensor keeps its own factor: a NaN weight, an inf update, a zero or an
    # empty tensor in the group changes no other tensor's factor.
    rng = np.random.default_rng(7)
    shapes = {"big": (300, 256), "k": (4, 3), "b": (3,), "s": (), "c": (2, 2, 3), "e": (0,),
              "zero": (5,), "nanw": (6,), "infu": (4,), "h1": (5,), "h2": (2, 3)}
    u = {k: rng.normal(size=s) * 10.0 ** rng.uniform(-3, 0, size=s) for k, s in shapes.items()}
    w = {k: rng.normal(size=s) * 10.0 ** rng.uniform(-2, 1, size=s) for k, s in shapes.items()}
    u["zero"] = np.zeros(5)
    w["nanw"][2] = np.nan
    u["infu"][1] = np.inf
    dt = {"h1": jnp.bfloat16, "h2": jnp.float16}
    u = {k: jnp.asarray(v, dt.get(k, jnp.float32)) for k, v in u.items()}
    w = {k: jnp.asarray(v, dt.get(k, jnp.float32)) for k, v in w.items()}
    tx = optclip.clippy(0.1, 1e-4)
    out, state = jax.jit(tx.update)(u, tx.init(w), w)
    for k in shapes:
        uu, ww = np.asarray(u[k], np.float64), np.asarray(w[k], np.float64)
        got = np.asarray(out[k], np.float64)
        if k == "nanw":
            assert np.isnan(got).all()
            continue
        fin = np.isfinite(uu)
        want = np_sigma(np.where(fin, uu, 0), ww, 0.1, 1e-4) * uu
        # the output is rounded to its dtype (float16's subnormals are 2**-24 apart)
        np.testing.assert_allclose(got[fin], want[fin], rtol=1e-2 if k in dt else 2e-6,
                                   atol=2.0**-25 if k == "h2" else 0, err_msg=k)
        assert (got[~fin] == uu[~fin]).all(), k
        assert out[k].dtype == u[k].dtype, k
    assert any(np_sigma(np.asarray(u[k]), np.asarray(w[k]), 0.1, 1e-4) < 1
               for k in ("k", "b", "c", "h1", "h2"))  # the small ones are clipped, some of them
    assert bool(state.stats.nonfinite)


def test_stats_of_many_small_tensors_pair_each_norm_with_its_own_factor():
    # The small tensors' norms and factors come out of their stacks (several sizes, each
    # size in several places of the tree, one of a size alone, a zero-size one, and a large
    # tensor between them) and are put back in the tree's order: a norm paired with
    # another tensor's factor would change the norm after the clip, and so the scale.
    rng = np.random.default_rng(11)
    shapes = [(3,), (4, 2), (300, 256), (3,), (7,), (2, 4), (0,), (5, 3), (3,), (1, 15)]
    u = {f"t{i}": jnp.asarray(rng.normal(size=s) * 10.0 ** rng.uniform(-3, 0), jnp.float32)
         for i, s in enumerate(shapes)}
    w = {f"t{i}": jnp.asarray(rng.normal(size=s) * 10.0 ** rng.uniform(-2, 1), jnp.float32)
         for i, s in enumerate(shapes)}
    tx = optclip.clippy(0.1, 1e-5)
    out, state = jax.jit(tx.update)(u, tx.init(w), w)
    want = np_clippy(u, w, 0.1, 1e-5)
    sigmas = [want[k][1] for k in u]
    assert len({round(float(x), 6) for x in sigmas}) >= 6  # the factors differ
    before = math.sqrt(sum(float(np.sum(np.asarray(u[k], np.float64) ** 2)) for k in u))
    after = math.sqrt(sum(float(np.sum(want[k][0] ** 2)) for k in u))
    np.testing.assert_allclose(float(state.stats.grad_norm), before, rtol=1e-6)
    np.testing.assert_allclose(float(state.stats.scale), after / before, rtol=1e-5)
    for k in u:
        np.testing.assert_allclose(np.asarray(out[k], np.float64), want[k][0], rtol=2e-6,
                                   err_msg=k)


# --- stats, schedules, run-time thresholds ------------------------------------------------------


def test_stats_values():
    tx = optclip.clippy(0.1, 0.0)
    w = {"a": jnp.array([1.0, 10.0]), "b": jnp.array([100.0])}
    u = {"a": jnp.array([0.3, -0.4]), "b": jnp.array([1.2])}  # sigma_a = 1/3, sigma_b = 1
    state = tx.init(w)
    out, state = tx.update(u, state, w)
    s = optclip.stats(state, host=True)
    before = math.sqrt(0.3**2 + 0.4**2 + 1.2**2)
    after = math.sqrt((0.1**2 + (0.4 / 3) ** 2) + 1.2**2)
    np.testing.assert_allclose(s["grad_norm"], before, rtol=1e-6)
    np.testing.assert_allclose(s["grad_norm"], float(optclip.global_norm(u)), rtol=1e-6)
    np.testing.assert_allclose(s["threshold"], 0.1, rtol=1e-6)
    np.testing.assert_allclose(s["scale"], after / before, rtol=1e-6)
    np.testing.assert_allclose(s["scale"], float(optclip.global_norm(out)) / before, rtol=1e-6)
    assert s["clipped"] is True and s["clip_count"] == 1
    assert s["nonfinite"] is False and s["invalid_threshold"] is False
    np.testing.assert_allclose(s["peak_grad_norm"], before, rtol=1e-6)
    # a step below every bound: scale 1, not clipped, counters carried on
    _, state = tx.update({"a": jnp.array([0.01, 0.01]), "b": jnp.array([0.0])}, state, w)
    s = optclip.stats(state, host=True)
    assert s["clipped"] is False and s["scale"] == 1.0 and s["clip_count"] == 1
    np.testing.assert_allclose(s["peak_grad_norm"], before, rtol=1e-6)
    assert int(state.count) == 2
    # found by name in a chain
    chain = optax.chain(optax.sgd(1.0), optclip.clippy())
    _, cs = chain.update(u, chain.init(w), w)
    assert "clipped" in optclip.stats(cs) and "clippy/clipped" in optclip.stats(cs, prefix=True)


def test_schedule_threshold_follows_count():
    sched = optax.piecewise_constant_schedule(0.1, {2: 10.0})  # 0.1, 0.1, then 1.0
    tx = optclip.clippy(sched, 0.0)
    w = {"a": jnp.array([1.0])}
    u = {"a": jnp.array([0.5])}
    state = tx.init(w)
    got = []
    for _ in range(3):
        out, state = jax.jit(tx.update)(u, state, w)
        got.append(float(out["a"][0]))
    np.testing.assert_allclose(got, [0.1, 0.1, 0.5], rtol=1e-6)
    np.testing.assert_allclose(float(state.stats.threshold), 1.0)
    # lambda_abs as a schedule too
    tx = optclip.clippy(0.0, optax.linear_schedule(0.0, 1.0, 4))
    state = tx.init(w)
    got = []
    for _ in range(3):
        out, state = tx.update(u, state, w)
        got.append(float(out["a"][0]))
    np.testing.assert_allclose(got, [0.0, 0.25, 0.5], rtol=1e-6)


@pytest.mark.parametrize("which", ["lambda_rel", "lambda_abs"])
@pytest.mark.parametrize("bad", [-0.5, math.nan])
def test_invalid_runtime_threshold_zeroes_and_flags(which, bad):
    w = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([3.0])}
    u = {"a": jnp.array([0.5, -0.05]), "b": jnp.array([0.01])}

    @jax.jit
    def step(u, w, lam):
        kw = {"lambda_rel": 0.1, "lambda_abs": 1e-3, which: lam}
        tx = optclip.clippy(**kw)
        return tx.update(u, tx.init(w), w)

    out, state = step(u, w, jnp.float32(bad))
    for k in u:
        o = np.asarray(out[k])
        assert np.all(o == 0), (k, o)   # no sign flip, nothing let through
        assert not np.any(np.isnan(o))
    assert bool(state.stats.invalid_threshold) and bool(state.stats.clipped)
    # the same traced argument, valid, clips normally and does not flag
    out, state = step(u, w, jnp.float32(0.1 if which == "lambda_rel" else 1e-3))
    assert not bool(state.stats.invalid_threshold)
    np.testing.assert_allclose(out["b"], [0.01])
    assert np.all(np.sign(np.asarray(out["a"])) == np.sign(np.asarray(u["a"])))


def test_inject_hyperparams():
    tx = optax.inject_hyperparams(optclip.clippy)(lambda_rel=0.1, lambda_abs=0.0)
    w = {"a": jnp.array([1.0])}
    state = tx.init(w)
    out, state = jax.jit(tx.update)({"a": jnp.array([0.5])}, state, w)
    np.testing.assert_allclose(out["a"], [0.1], rtol=1e-6)
    state.hyperparams["lambda_rel"] = jnp.asarray(0.2)
    out, state = jax.jit(tx.update)({"a": jnp.array([0.5])}, state, w)
    np.testing.assert_allclose(out["a"], [0.2], rtol=1e-6)


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,match", [
    ({"lambda_rel": -0.1}, "lambda_rel"),
    ({"lambda_rel": math.nan}, "lambda_rel"),
    ({"lambda_abs": -1e-7}, "lambda_abs"),
    ({"lambda_abs": math.nan}, "lambda_abs"),
    ({"lambda_rel": "0.1"}, "lambda_rel"),
    ({"lambda_abs": None}, "lambda_abs"),
])
def test_bad_thresholds_raise_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        optclip.clippy(**kw)


def test_params_missing_or_mismatched_raise():
    tx = optclip.clippy()
    u = {"a": jnp.ones(2), "b": jnp.ones(3)}
    state = tx.init(u)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(u, state)
    with pytest.raises(ValueError, match=r"params at \['b'\] has shape \(4,\)"):
        tx.update(u, state, {"a": jnp.ones(2), "b": jnp.ones(4)})
    with pytest.raises(ValueError, match=r"params at \['b'\] is None"):
        tx.update(u, state, {"a": jnp.ones(2), "b": None})
    with pytest.raises(ValueError, match="params must have the structure"):
        tx.update(u, state, {"a": jnp.ones(2)})
    # a None update does not need its param
    out, _ = tx.update({"a": jnp.ones(2), "b": None}, state, {"a": jnp.ones(2), "b": None})
    assert out["b"] is None


# --- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_trains_least_squares_after_optimizer(opt):
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    x_true = jnp.asarray([1.0, -2.0, 0.5, 3.0])
    b = a @ x_true
    x_star = np.linalg.lstsq(np.asarray(a), np.asarray(b), rcond=None)[0]
    inner = optax.adam(0.05) if opt == "adam" else optax.sgd(0.5)
    tx = optax.chain(inner, optclip.clippy(lambda_rel=0.1, lambda_abs=1e-2))
    params = {"x": jnp.zeros(4)}

    def loss(p):
        return 0.5 * jnp.mean((a @ p["x"] - b) ** 2)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    for _ in range(300):
        params, state = step(params, state)
    assert int(optclip.stats(state)["clip_count"]) > 0  # clippy did engage from x = 0
    np.testing.assert_allclose(params["x"], x_star, atol=2e-2)


def np_clippy_adagrad(grads, w0, lr, lam_rel, lam_abs, acc0=0.1, eps=1e-7):
    """TFRS ClippyAdagrad, use_standard_accumulator_update=True, accumulator_relative_threshold
    = 0, from its documented algorithm: acc += g^2; delta = lr g / sqrt(acc + eps); w -= sigma
    delta."""
    w = np.asarray(w0, np.float64)
    acc = np.full_like(w, acc0)
    for g in grads:
        g = np.asarray(g, np.float64)
        acc = acc + g * g
        delta = lr * g / np.sqrt(acc + eps)
        w = w - np_sigma(delta, w, lam_rel, lam_abs) * delta
    return w


def test_matches_tfrs_clippy_adagrad_without_accumulator_term():
    rng = np.random.default_rng(3)
    w0 = jnp.asarray(rng.normal(size=(5,)) * 0.1, jnp.float32)
    grads = [jnp.asarray(rng.normal(size=(5,)) * s, jnp.float32) for s in (1, 1, 30, 1, 1)]
    tx = optax.chain(optax.adagrad(0.5, initial_accumulator_value=0.1, eps=1e-7),
                     optclip.clippy(0.1, 1e-7))
    w, state = w0, tx.init(w0)
    for g in grads:
        u, state = tx.update(g, state, w)
        w = optax.apply_updates(w, u)
    assert int(optclip.stats(state)["clip_count"]) > 0
    np.testing.assert_allclose(w, np_clippy_adagrad(grads, w0, 0.5, 0.1, 1e-7), rtol=1e-5)


# --- every clipper after the optimizer clips the update -----------------------------------------


def grad_sequence(n, spike_at=None):
    rng = np.random.default_rng(11)
    out = []
    for t in range(n):
        s = 50.0 if t == spike_at else 1.0
        out.append({"k": jnp.asarray(rng.normal(size=(3, 4)) * s, jnp.float32),
                    "b": jnp.asarray(rng.normal(size=(4,)) * s, jnp.float32)})
    return out


def raw_updates(opt, grads, params):
    state = opt.init(params)
    out = []
    for g in grads:
        u, state = opt.update(g, state, params)
        out.append(u)
    return out


def test_block_rms_after_adam_is_update_rms_clipping():
    # Adafactor's update clipping / Levanter's update_rms_clipping: clip each update tensor's RMS
    params = {"k": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
    grads = grad_sequence(4)
    thr = 0.5
    tx = optax.chain(optax.adam(1.0), optclip.clip_by_block_rms(thr))
    state = tx.init(params)
    raw = raw_updates(optax.adam(1.0), grads, params)
    n_clipped = 0
    for g, r in zip(grads, raw, strict=True):
        u, state = tx.update(g, state, params)
        for k in r:
            x = np.asarray(r[k], np.float64)
            rms = np.sqrt(np.mean(x * x))
            want = x * min(1.0, thr / rms) if rms > 0 else x
            n_clipped += rms > thr
            np.testing.assert_allclose(np.asarray(u[k]), want, rtol=1e-5, atol=1e-7)
    assert n_clipped > 0  # Adam's first step has RMS 1: the clip engages


def test_zclip_after_optimizer_clips_the_update_norm():
    params = {"k": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
    grads = grad_sequence(8, spike_at=6)
    make = lambda: optclip.zclip(warmup_steps=3, z_thresh=2.0)  # noqa: E731
    # momentum: the update sequence is not the gradient sequence, scaled
    chained = optax.chain(optax.sgd(0.1, momentum=0.9), make())
    raw = raw_updates(optax.sgd(0.1, momentum=0.9), grads, params)
    alone = make()
    s1, s2 = chained.init(params), alone.init(params)
    n_clipped = 0
    for g, r in zip(grads, raw, strict=True):
        u1, s1 = chained.update(g, s1, params)
        u2, s2 = alone.update(r, s2, params)
        for k in r:
            np.testing.assert_allclose(np.asarray(u1[k]), np.asarray(u2[k]), rtol=1e-6)
        st1, st2 = optclip.stats(s1, host=True), optclip.stats(s2, host=True)
        np.testing.assert_allclose(st1["grad_norm"], float(optclip.global_norm(r)), rtol=1e-6)
        assert st1 == pytest.approx(st2)
        n_clipped += st1["clipped"]
    assert n_clipped > 0  # the spike was clipped: the comparison is not vacuous


# --- state: donation, serialization, sharding ---------------------------------------------------


def test_fresh_state_can_be_donated():
    tx = optax.chain(optax.adam(1.0), optclip.clippy())  # steps of 1 on weights of 1: clips
    params = {"a": jnp.ones((3,)), "b": jnp.ones((2, 2))}
    leaves = jax.tree.leaves(optclip.clippy().init(params))
    ptrs = [x.unsafe_buffer_pointer() for x in leaves]
    assert len(set(ptrs)) == len(ptrs)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    g = jax.tree.map(jnp.ones_like, params)
    # keep_unused: the stats fields that the step overwrites are donated too, not pruned
    f = jax.jit(step, donate_argnums=(1,), keep_unused=True)
    state = tx.init(params)
    p2, s2 = f(params, state, g)
    _, s3 = f(p2, s2, g)
    assert all(x.is_deleted() for x in jax.tree.leaves(state))  # really donated
    assert int(optclip.stats(s3)["clip_count"]) == 2
    # the check can fail: a state holding one buffer twice cannot be donated
    st = tx.init(params)
    z = jnp.zeros((), jnp.float32)
    shared = (st[0], st[1]._replace(stats=st[1].stats._replace(grad_norm=z, peak_grad_norm=z)))
    with pytest.raises(ValueError, match="donate the same buffer twice"):
        f(params, shared, g)


def test_flax_serialization_round_trip_is_bit_identical():
    tx = optclip.clippy(0.1, 1e-3)
    params = {"k": jnp.ones((3, 4)) * 0.5, "b": jnp.zeros(4)}
    grads = grad_sequence(4, spike_at=1)
    state = tx.init(params)
    for g in grads[:2]:
        _, state = tx.update(g, state, params)
    restored = flax.serialization.from_bytes(tx.init(params),
                                             flax.serialization.to_bytes(state))
    assert type(restored) is type(state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for g in grads[2:]:
        u1, state = tx.update(g, state, params)
        u2, restored = tx.update(g, restored, params)
        for k in g:
            np.testing.assert_array_equal(np.asarray(u1[k]), np.asarray(u2[k]))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 (simulated) devices")
def test_shard_map_equals_unsharded():
    u, w = {"k": jnp.asarray(np.random.default_rng(5).normal(size=(8, 3)) * 0.3, jnp.float32),
            "r": jnp.asarray([0.2, -0.3, 0.05], jnp.float32)}, \
           {"k": jnp.asarray(np.random.default_rng(6).normal(size=(8, 3)), jnp.float32),
            "r": jnp.asarray([1.0, 0.1, 2.0], jnp.float32)}
    # the smallest bound of "k" lies on one device only: without the pmin the shards differ
    w["k"] = w["k"].at[7, 0].set(1e-3)
    # and "k2", whose shards (8 elements) share a padded stack with "k"'s (6)
    u["k2"] = jnp.asarray(np.random.default_rng(8).normal(size=(8, 4)) * 0.3, jnp.float32)
    w["k2"] = jnp.asarray(np.random.default_rng(9).normal(size=(8, 4)), jnp.float32)
    tx = optclip.clippy(0.1, 0.0)
    want, ws = tx.update(u, tx.init(w), w)
    mesh = Mesh(np.array(jax.devices()[:4]), ("x",))
    specs = {"k": P("x"), "k2": P("x"), "r": P()}
    for kw in ({"partition_specs": specs}, {}):
        txs = optclip.clippy(0.1, 0.0, **kw)
        f = jax.jit(jax.shard_map(lambda u, s, w: txs.update(u, s, w), mesh=mesh,  # noqa: B023
                                  in_specs=(specs, P(), specs), out_specs=(specs, P()),
                                  check_vma=False))
        got, gs = f(u, txs.init(w), w)
        same = np.allclose(np.asarray(got["k"]), np.asarray(want["k"]), rtol=1e-6)
        if kw:
            assert same
            np.testing.assert_allclose(got["k2"], want["k2"], rtol=1e-6)
            np.testing.assert_allclose(got["r"], want["r"], rtol=1e-6)
            np.testing.assert_allclose(float(gs.stats.grad_norm), float(ws.stats.grad_norm),
                                       rtol=1e-6)
        else:
            assert not same  # the test can tell


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 (simulated) devices")
def test_shard_map_nan_weight_on_one_device_makes_the_whole_tensor_nan():
    # the NaN lies in one shard; it crosses devices as a negative ratio in the pmin, which
    # a NaN itself might not survive
    w = {"k": jnp.ones((8, 512)).at[7, 3].set(jnp.nan), "r": jnp.ones(3)}
    u = {"k": jnp.full((8, 512), 0.5), "r": jnp.full(3, 0.5)}
    specs = {"k": P("x"), "r": P()}
    mesh = Mesh(np.array(jax.devices()[:4]), ("x",))
    tx = optclip.clippy(0.1, 1e-7, partition_specs=specs)
    f = jax.jit(jax.shard_map(tx.update, mesh=mesh, in_specs=(specs, P(), specs),
                              out_specs=(specs, P())))
    got, _ = f(u, tx.init(w), w)
    assert np.isnan(np.asarray(got["k"])).all()
    np.testing.assert_allclose(got["r"], 0.1 + 1e-7, rtol=1e-6)
    # jit over NamedSharding: the same as unsharded
    plain = optclip.clippy(0.1, 1e-7)
    put = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in w.items()}
    got, _ = jax.jit(plain.update)(
        {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in u.items()},
        plain.init(w), put)
    assert np.isnan(np.asarray(got["k"])).all()
    np.testing.assert_allclose(got["r"], 0.1 + 1e-7, rtol=1e-6)
    # pmap, the tensor split along its rows
    pm = optclip.clippy(0.1, 1e-7, axis_name="x")
    got, _ = jax.pmap(lambda u, w: pm.update(u, pm.init(w), w), axis_name="x",
                      devices=jax.devices()[:4])(
        u["k"].reshape(4, 2, 512), w["k"].reshape(4, 2, 512))
    assert np.isnan(np.asarray(got)).all()


# --- one pass over rows: the factors and the norm stat on large tensors, every layout -----------

# Each large tensor (over norms.SMALL_LEAF elements) takes its ratios' min and its norm from one
# variadic reduction over rows of at most 4,096 elements: "merge" over its two trailing dims,
# "last" over its last one, "split" and "flat" over their last axis split in rows, "prime" (no
# divisor of its length makes a row) by plain reductions; "alone", a small tensor with no other
# of its size, is a row of 16,384 elements, split too; "s0", "s1" and "s2" are small ones, stacked.
# "short": rows of 24 (3 a device in shard_map), each taking k of the 8,192 before them;
# "short_prime": rows of 5, the 16,411 before them prime (no k): plain reductions
ROWS = {"merge": (40, 16, 256), "last": (48, 2048), "split": (8, 16384), "flat": (1 << 17,),
        "prime": (65537,), "alone": (2, 8192), "short": (8192, 24), "short_prime": (16411, 5),
        "s0": (4, 9), "s1": (4, 9), "s2": (8,)}
ROWS_SPECS = {"merge": P("x"), "last": P("x"), "split": P("x"), "flat": P("x"),
              "prime": P(), "alone": P(None, "x"), "short": P(None, "x"), "short_prime": P(),
              "s0": P(), "s1": P(), "s2": P()}


def _rows_tree(scale, nonfinite=False):
    rng = np.random.default_rng(11)
    u = {k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in ROWS.items()}
    # weights 5x the updates: most ratios above 1, a few below (sigma < 1 in every tensor)
    w = {k: (rng.normal(size=s) * 5 * scale).astype(np.float32) for k, s in ROWS.items()}
    u["s1"][:] = 0.0  # no bound: sigma 1
    if nonfinite:
        u["split"][3, 5], u["flat"][7], u["prime"][0] = np.nan, np.inf, -np.inf
    return u, w


def _rows_reference(u, w, lam_rel):
    """Per tensor (clipped update, sigma), the norm before, the scale, from float64 NumPy; a
    NaN or inf element sets no bound (as a zero one) and passes as it is."""
    out, sq_before, sq_after = {}, 0.0, 0.0
    for k in u:
        x = np.asarray(u[k], np.float64)
        s = np_sigma(np.where(np.isfinite(x), x, 0.0), w[k], lam_rel, 0.0)
        out[k] = (np.where(np.isfinite(x), x * s, x), s)
        sq_before += np.sum(x * x)
        sq_after += np.sum((x * s) ** 2)
    return out, math.sqrt(sq_before), math.sqrt(sq_after / sq_before)


def _rows_layout(how, mesh):
    """(tx, step(u, state, w) -> (out, state)) for one layout; thresholds as a float, an
    array and a schedule."""
    if how == "plain":
        tx = optclip.clippy(0.1, 0.0)
        return tx, jax.jit(tx.update)
    if how == "named":
        tx = optclip.clippy(jnp.asarray(0.1), jnp.zeros(()))
        sh = {k: NamedSharding(mesh, s) for k, s in ROWS_SPECS.items()}
        f = jax.jit(tx.update)
        return tx, lambda u, s, w: f(jax.device_put(u, sh), s, jax.device_put(w, sh))
    if how == "shard_map":
        tx = optclip.clippy(optax.constant_schedule(0.1), 0.0, partition_specs=ROWS_SPECS)
        return tx, jax.jit(jax.shard_map(tx.update, mesh=mesh,
                                         in_specs=(ROWS_SPECS, P(), ROWS_SPECS),
                                         out_specs=(ROWS_SPECS, P())))
    # pmap: every tensor's elements split 8 ways (the prime one and the small ones, whose
    # lengths 8 does not divide, are left out of this layout)
    tx = optclip.clippy(jnp.asarray(0.1), 0.0, axis_name="i")
    keep = [k for k in ROWS if k not in ("prime", "short_prime", "s0", "s1")]
    pm = jax.pmap(tx.update, axis_name="i", in_axes=(0, None, 0), out_axes=(0, None))

    def step(u, s, w):
        cut = lambda t: {k: jnp.reshape(t[k], (8, -1)) for k in keep}  # noqa: E731
        out, s = pm(cut(u), s, cut(w))
        return {k: np.reshape(np.asarray(out[k]), ROWS[k]) for k in keep}, s
    return tx, step


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("how", ["plain", "named", "shard_map", "pmap"])
def test_one_pass_factors_and_norm_match_numpy_at_every_scale_and_layout(how):
    # Scales whose squares overflow (1e25) or flush to 0 (1e-25) in float32: the norm is
    # still the true one, from Blue's three sums (no second pass, no lax.cond).
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    tx, step = _rows_layout(how, mesh)
    for scale, bad in ((1e-3, False), (1e25, False), (1e-25, False), (1e-3, True)):
        u, w = _rows_tree(scale, bad)
        if how == "pmap":
            u = {k: u[k] for k in ROWS if k not in ("prime", "short_prime", "s0", "s1")}
            w = {k: w[k] for k in u}
        want, norm, ratio = _rows_reference(u, w, 0.1)
        out, state = step(u, tx.init(w), w)
        s = optclip.stats(state, host=True)
        for k in u:
            np.testing.assert_allclose(np.asarray(out[k], np.float64), want[k][0], rtol=1e-6,
                                       atol=0, err_msg=f"{k} at {scale}")
        assert s["nonfinite"] is bad and s["clipped"] is True
        if not bad:
            np.testing.assert_allclose(s["grad_norm"], norm, rtol=2e-6, err_msg=str(scale))
            np.testing.assert_allclose(s["scale"], ratio, rtol=2e-6, err_msg=str(scale))


def test_derivatives_with_respect_to_weights_and_threshold_match_finite_differences():
    # JAX's rule for a variadic reduction failed on the tangents that only the weights or a
    # threshold leave (Blue's terms of the update have none): a TypeError at d7eab22
    rng = np.random.default_rng(3)
    u = {"a": jnp.asarray(rng.normal(size=40), jnp.float32),
         "b": jnp.asarray(rng.normal(size=(3, 70000)), jnp.float32)}
    w = {k: v * jnp.asarray(rng.uniform(1, 3, size=v.shape), jnp.float32) for k, v in u.items()}

    def loss(w, lam):
        t = optclip.clippy(lam, 0.0)
        return sum(jnp.sum(v) for v in t.update(u, t.init(w), w)[0].values())

    gw, glam = jax.jit(jax.grad(loss, argnums=(0, 1)))(w, jnp.float32(0.1))
    eps = 1e-3
    fd = (loss(w, 0.1 + eps) - loss(w, 0.1 - eps)) / (2 * eps)
    np.testing.assert_allclose(float(glam), float(fd), rtol=1e-2)
    for k in w:  # each tensor's factor moves with its arg-min weight only
        g = np.asarray(gw[k]).ravel()
        assert np.isfinite(g).all() and np.count_nonzero(g) == 1, k
        j = int(np.flatnonzero(g)[0])
        bump = lambda d, k=k, j=j: loss({**w, k: w[k].ravel().at[j].add(d).reshape(  # noqa: E731
            w[k].shape)}, 0.1)
        # one-sided, toward a smaller |w_j|, which keeps it the arg-min
        d = -float(np.sign(w[k].ravel()[j])) * 1e-3 * abs(float(w[k].ravel()[j]))
        np.testing.assert_allclose(g[j], float((bump(d) - bump(0.0)) / d), rtol=2e-2)
    jac = jax.jacfwd(lambda a: optclip.clippy(0.1, 0.0).update(
        {"a": u["a"]}, optclip.clippy().init(w), {"a": a})[0]["a"])(w["a"])
    assert jac.shape == (40, 40) and np.isfinite(np.asarray(jac)).all()
    # and the stats' norm has a finite derivative (unselected roots of 0 made it NaN)
    g = jax.grad(lambda u: optclip.stats(
        optclip.clippy(0.1, 0.0).update(u, optclip.clippy().init(w), w)[1])["grad_norm"])(u)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("how", ["plain", "shard_map"])
def test_stats_norm_gradient_at_every_scale(how):
    # Differentiated through Blue's scaled sums, d grad_norm / du was NaN for updates near
    # 1e-25 and 0 near 3e-20 (the scales under- and overflowed the cotangents); its
    # derivative is attached directly now: u / ||u||, across devices too. A large tensor
    # (reduced whole, sharded in shard_map) and two small ones (stacked as rows).
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    specs = {"big": P("x"), "s": P(), "t": P()}
    rng = np.random.default_rng(5)
    base = {"big": rng.normal(size=70000), "s": rng.normal(size=(3, 4)), "t": rng.normal(size=5)}
    # weights that clip the 1e-3 updates below (ratios 0.5-2, distinct)
    w = {k: jnp.asarray(np.abs(v) * rng.uniform(0.005, 0.02, size=v.shape), jnp.float32)
         for k, v in base.items()}
    tx = optclip.clippy(0.1, 0.0, **({"partition_specs": specs} if how == "shard_map" else {}))
    upd = tx.update if how == "plain" else jax.shard_map(
        tx.update, mesh=mesh, in_specs=(specs, P(), specs), out_specs=(specs, P()))
    grad = jax.jit(jax.grad(lambda u: upd(u, tx.init(w), w)[1].stats.grad_norm))
    # 5e35: norms near 1.3e38, above 2**126 (a reciprocal XLA flushed made the gradient 0)
    for scale in (1e-3, 3e-20, 1e-25, 1e25, 5e35):
        u = {k: jnp.asarray(v * scale, jnp.float32) for k, v in base.items()}
        x = {k: np.asarray(v, np.float64) for k, v in u.items()}
        norm = math.sqrt(sum(np.sum(v * v) for v in x.values()))
        g = grad(u)
        for k in u:
            np.testing.assert_allclose(np.asarray(g[k], np.float64), x[k] / norm, rtol=2e-5,
                                       atol=1e-9, err_msg=f"{k} at {scale}")
    if how == "shard_map":
        # and the updates' gradient across devices (JAX has no rule for the factors' pmin: a
        # NotImplementedError before) equals the unsharded one
        u = {k: jnp.asarray(v * 1e-3, jnp.float32) for k, v in base.items()}
        r = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in base.items()}

        def loss(f):
            return lambda u: sum(jnp.sum(o * r[k]) for k, o in f(u, tx.init(w), w)[0].items())

        plain = optclip.clippy(0.1, 0.0)
        got, want = jax.jit(jax.grad(loss(upd)))(u), jax.jit(jax.grad(loss(plain.update)))(u)
        for k in u:
            np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-5,
                                       atol=1e-7, err_msg=k)
        # each tensor clips: its arg-min element's gradient differs from its factor
        s = optclip.stats(plain.update(u, plain.init(w), w)[1], host=True)
        assert s["clipped"] and s["scale"] < 1


@pytest.mark.parametrize("n", [3, 70000])
@pytest.mark.parametrize("lam", [(0.1, 1e-7), (np.inf, 1e-7), (0.1, np.inf), (np.inf, 0.0)])
def test_gradient_is_finite_for_tiny_updates_and_infinite_thresholds(lam, n):
    # A ratio the min does not select had an infinite derivative where |u_j| is tiny but
    # normal (0.1 / 1e-25**2) or a threshold is inf, and jax.grad multiplied it by a zero
    # cotangent: the updates' gradient was NaN. Reference, from the formula: f = sigma *
    # sum(u) with sigma = min(1, min_j b_j / |u_j|), b_j = lambda_rel |w_j| + lambda_abs (inf
    # times a zero weight 0), so df/du_j = sigma + [j = j*] sum(u) dsigma/du_j*.
    lr, la = lam
    rng = np.random.default_rng(n)
    u = rng.uniform(0.2, 1.0, size=n) * rng.choice([-1.0, 1.0], size=n)
    w = rng.uniform(1.0, 3.0, size=n)
    u[1], w[2] = 1e-25, 0.0  # a tiny update; a zero weight, the arg-min where lambda_rel is inf
    tx = optclip.clippy(lr, la)

    def f(u):
        return jnp.sum(tx.update({"a": u}, tx.init({"a": w}), {"a": jnp.asarray(w)})[0]["a"])

    g = np.asarray(jax.jit(jax.grad(f))(jnp.asarray(u, jnp.float32)), np.float64)
    uu = np.asarray(jnp.asarray(u, jnp.float32), np.float64)
    b = np.where(w == 0, 0.0, lr * np.where(w == 0, 1.0, w)) + la
    r = np.where(np.abs(uu) > 0, b / np.abs(uu), np.inf)
    sigma = min(1.0, r.min())
    want = np.full(n, sigma)
    if r.min() < 1:
        j = int(np.argmin(r))
        want[j] += uu.sum() * -r[j] / uu[j]  # d(b_j / |u_j|)/du_j = -b_j / (|u_j| u_j)
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, want, rtol=2e-5, atol=1e-12)
    # forward mode too: under an infinite threshold every ratio is inf, and their clamped
    # tangents, tied, overflowed in the min over a large tensor's rows (NaN)
    _, jv = jax.jit(lambda u: jax.jvp(f, (u,), (jnp.ones_like(u),)))(jnp.asarray(u, jnp.float32))
    np.testing.assert_allclose(float(jv), want.sum(), rtol=1e-4)
    if np.isinf(lr) or np.isinf(la):
        # no zero weight: every bound is inf, and sigma 1. Op by op (as under jit XLA may
        # simplify the tangents' overflow away), each output's tangent is its input's. The
        # updates of one sign, so that the tied tangents do not cancel.
        w1 = jnp.asarray(np.where(w == 0, 1.0, w), jnp.float32)
        _, jv = jax.jvp(lambda u: tx.update({"a": u}, tx.init({"a": w1}), {"a": w1})[0]["a"],
                        (jnp.asarray(np.abs(u), jnp.float32),), (jnp.ones(n, jnp.float32),))
        np.testing.assert_array_equal(np.asarray(jv), 1.0)
    # and with respect to the weights (inf * w was differentiated as inf * 0 = NaN)
    gw = jax.jit(jax.grad(lambda w: jnp.sum(tx.update({"a": jnp.asarray(u, jnp.float32)},
                                                      tx.init({"a": w}), {"a": w})[0]["a"])))(
        jnp.asarray(w, jnp.float32))
    assert np.isfinite(np.asarray(gw)).all()


@pytest.mark.parametrize("n", [33, 70000])
def test_a_subnormal_update_sets_no_bound(n):
    # XLA flushes a subnormal |u_j| in the division: 0 / 0, a NaN factor (for a large tensor
    # since d7eab22, whose variadic min keeps a NaN); it counts as 0 now. Zero weights and
    # lambda_abs = 0 allow no move: every other element pins sigma to 0.
    tx = optclip.clippy(0.1, 0.0)
    u, w = {"a": jnp.ones(n).at[3].set(1e-40)}, {"a": jnp.zeros(n)}
    out, state = jax.jit(tx.update)(u, tx.init(w), w)
    np.testing.assert_array_equal(np.asarray(out["a"]), 0.0)
    assert optclip.stats(state, host=True)["nonfinite"] is False


def test_large_tensors_of_one_shape_share_one_trace(monkeypatch):
    # Its per-piece pass is jitted, traced once per shape: a model's repeated layers share one
    # trace and one lowering (GPT-2's 50 large tensors have 6 shapes). It was traced for each
    # tensor: 4 times here.
    mod = sys.modules["optclip.clippy"]
    shared = getattr(mod, "_one_pass_shared", None)  # (absent before it was shared)
    if shared is not None:
        shared.clear_cache()  # a trace cached by an earlier run in this process
    seen = []
    real = mod._ratios
    monkeypatch.setattr(mod, "_ratios", lambda u, *a: seen.append(u.shape) or real(u, *a))
    x = jax.ShapeDtypeStruct((263, 257), jnp.float32)  # large, and no other test's shape
    tree = {k: x for k in "abcd"}
    tx = optclip.clippy(0.1, 1e-7)
    jax.jit(tx.update).lower(tree, tx.init(tree), tree)
    assert seen == [(263, 257)]


def test_short_rows_and_sharded_long_rows_hold_no_copy():
    # a (n, 2) table reduced as rows of 2 held 1.5x its size in temporaries; it is raveled
    # first now
    tx = optclip.clippy(0.1, 0.0)
    for shape in [(1 << 17, 2), (1 << 18, 1)]:
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        c = jax.jit(tx.update).lower({"a": x}, tx.init({"a": x}), {"a": x}).compile()
        assert c.memory_analysis().temp_size_in_bytes < 0.05 * np.prod(shape) * 4, shape
    # a last axis of 12,288 sharded 8 ways under jit: rows of 4,096 cut across its shards,
    # and XLA gathered the whole tensor onto every device
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    x = jax.ShapeDtypeStruct((64, 12288), jnp.float32,
                             sharding=NamedSharding(mesh, P(None, "x")))
    c = jax.jit(tx.update).lower({"a": x}, tx.init({"a": x}), {"a": x}).compile()
    assert "all-gather" not in c.as_text()
    # a short last axis sharded 8 ways: raveling it (eee9749) made XLA gather the whole
    # tensor onto every device, 16x the arguments in temporaries. Each row takes 128 of the
    # 4,096 before it now: only the rows' partial results cross devices (32 x 8 of them).
    x = jax.ShapeDtypeStruct((4096, 32), jnp.float32, sharding=NamedSharding(mesh, P(None, "x")))
    c = jax.jit(tx.update).lower({"a": x}, tx.init({"a": x}), {"a": x}).compile()
    gathered = [math.prod(int(d) for d in re.findall(r"\d+", shp)) for shp in re.findall(
        r"= f32\[([\d,]*)\][^ ]* all-gather\(", c.as_text())]
    assert all(n < 0.01 * 4096 * 32 for n in gathered), gathered
    assert c.memory_analysis().temp_size_in_bytes < 0.05 * 4096 * 32 * 4


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.bool_, jnp.int8])
@pytest.mark.parametrize("n", [2, 70_000])
def test_params_of_integer_and_bool_dtypes_bound_as_their_values(dtype, n):
    # Unsigned and bool params are their own magnitude: |w| by lax.abs, which rejects them,
    # raised a TypeError (5d66005, found in review); jnp.abs had taken them as they are.
    tx = optclip.clippy(0.1, 1e-2)
    u = {"w": jnp.tile(jnp.array([0.5, 0.05], jnp.float32), n // 2)}
    w = {"w": jnp.ones(n, dtype)}
    out, _ = tx.update(u, tx.init(w), w)
    # bound 0.1 * 1 + 0.01 = 0.11: the largest update, 0.5, takes sigma = 0.22
    np.testing.assert_allclose(np.asarray(out["w"]), np.asarray(u["w"]) * 0.22, rtol=1e-6)


def test_float64_leaves_take_float64_thresholds():
    # the thresholds were float32 for every leaf: 0.1 became 0.10000000149, a relative error
    # of 1.5e-8 in float64's factor (its docstring promises float64 for float64 leaves)
    with jax.enable_x64(True):
        u, w = {"a": jnp.array([1.0, 0.5], jnp.float64)}, {"a": jnp.ones(2, jnp.float64)}
        for lam in (0.1, lambda count: 0.1 + 0.0 * count):
            tx = optclip.clippy(lam, 0.0)
            out, _ = jax.jit(tx.update)(u, tx.init(w), w)
            assert out["a"].dtype == jnp.float64
            np.testing.assert_array_equal(np.asarray(out["a"]), [0.1, 0.05])
