"""optclip.norms against float64 NumPy."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from refs import np_leaves, pnorm
from strategies import arrays, ords, trees

import optclip
from optclip import norms as _n

global_norm_jit = jax.jit(optclip.global_norm, static_argnames="ord")


@given(trees(dtypes=("float32", "float16", "bfloat16")), ords)
def test_global_norm_matches_numpy(tree, p):
    ref = pnorm(np_leaves(jax.tree.leaves(tree)), p)
    got = float(optclip.global_norm(tree, ord=p))
    if math.isinf(ref):  # beyond float32's range: inf is the right answer
        assert math.isinf(got)
    else:
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=0)


@given(trees(), ords)
def test_jit_equals_eager(tree, p):
    np.testing.assert_allclose(float(global_norm_jit(tree, ord=p)),
                               float(optclip.global_norm(tree, ord=p)), rtol=1e-6)


def test_fp16_does_not_overflow():
    x = jnp.full((1000,), 300.0, jnp.float16)
    assert not np.isfinite(float(optax.global_norm(x)))  # Optax overflows in fp16
    np.testing.assert_allclose(float(optclip.global_norm(x)), 300 * math.sqrt(1000), rtol=1e-6)
    assert optclip.global_norm(x).dtype == jnp.float32


@pytest.mark.parametrize("value,dtype", [(1e38, jnp.bfloat16), (1e38, jnp.float32),
                                         (6e4, jnp.float16), (1e-30, jnp.float32),
                                         (1e-37, jnp.float32), (1e-30, jnp.bfloat16)])
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_extremes_give_true_norm(value, dtype, p):
    x = jnp.full((10,), value, dtype)
    ref = float(np.asarray(x[0], np.float64)) * 10 ** (1 / p)
    if ref > float(jnp.finfo(jnp.float32).max):
        pytest.skip("true norm beyond float32")
    np.testing.assert_allclose(float(global_norm_jit(x, ord=p)), ref, rtol=1e-5)


def test_beyond_float32_is_inf_not_nan():
    x = jnp.full((10,), 3e38, jnp.float32)
    assert float(optclip.global_norm(x)) == math.inf


def test_ignored_leaves_and_complex():
    f0 = np.zeros((3,), dtype=jax.dtypes.float0)
    tree = {"a": jnp.array([3.0]), "i": jnp.arange(5), "n": None, "f0": f0,
            "c": jnp.array([3.0 + 4.0j])}
    np.testing.assert_allclose(float(optclip.global_norm(tree)), math.sqrt(9 + 25), rtol=1e-6)
    norms = optclip.leaf_norms(tree)
    assert float(norms["i"]) == 0.0 and float(norms["c"]) == 5.0 and norms["n"] is None


def test_empty_tree_is_zero():
    assert float(optclip.global_norm({})) == 0.0
    assert float(optclip.global_norm([jnp.zeros((0, 3))])) == 0.0


def test_float64_accumulates_in_float64():
    with jax.enable_x64(True):
        x = jnp.array([1.0, 1e-10], jnp.float64)
        n = optclip.global_norm([x, jnp.ones(1, jnp.float32)])
        assert n.dtype == jnp.float64
        assert float(n) == math.sqrt(2.0 + 1e-20)


_F32_CASES = [[1.0, 2.0], [1e-30] * 5, [1e30] * 5, [1e30, 1e-30, 1.0], [3e38, 1.0],
              [1e-19, 2e-19, 1e-25], [2.0 ** -63, 2.0 ** 44, 2.0 ** 45], [0.0, 0.0],
              list(np.random.default_rng(3).choice([-1, 1], 400)
                   * 10.0 ** np.random.default_rng(4).uniform(-37, 37, 400))]


@pytest.mark.parametrize("dtype", ["float32", "float64", "complex64"])
@pytest.mark.parametrize("case", range(len(_F32_CASES)))
def test_blue_norm_of_one_pass_sums_is_the_true_norm(dtype, case):
    # norms.blue_terms and blue_norm (Blue 1978): plain sums of three scaled squares give the
    # true L2 norm whether |x|**2 would overflow, flush to 0 as a subnormal, or neither,
    # against float64 (long double for float64) NumPy. Subnormal inputs are left out: XLA:CPU
    # flushes them to 0, in every norm here.
    vals = np.asarray(_F32_CASES[case], np.float64)
    if dtype == "float64":
        vals = vals * 1e250 if case in (2, 4) else vals * 1e-250 if case == 1 else vals
    if dtype == "complex64":
        vals = vals * (0.6 + 0.8j)  # |v| as before
    with jax.enable_x64(dtype == "float64"):
        x = jnp.asarray(vals, dtype)
        acc = jnp.float64 if dtype == "float64" else jnp.float32
        got = _n.blue_norm(*(jnp.sum(t) for t in _n.blue_terms(x, acc)))
        assert got.dtype == acc
        ref = np.abs(np.asarray(x)).astype(np.longdouble)
        want = float(np.sqrt(np.sum(ref * ref)))
        if want > float(jnp.finfo(acc).max):
            assert float(got) == math.inf  # the true norm is not a float32: inf, as it is
        else:
            np.testing.assert_allclose(float(got), want, rtol=1e-6 if acc == jnp.float32
                                       else 1e-14)


def test_blue_norm_is_nan_or_inf_for_nonfinite_elements():
    for bad, want in ((np.nan, math.nan), (np.inf, math.inf), (-np.inf, math.inf)):
        for rest in ([1.0, 2.0], [1e-30], [1e30], []):
            x = jnp.asarray([bad] + rest, jnp.float32)
            got = float(_n.blue_norm(*(jnp.sum(t) for t in _n.blue_terms(x, jnp.float32))))
            assert (math.isnan(got) if math.isnan(want) else got == want), (bad, rest, got)


def test_nonfinite_is_visible():
    assert math.isnan(float(optclip.global_norm(jnp.array([1.0, jnp.nan]))))
    assert float(optclip.global_norm(jnp.array([1.0, jnp.inf]))) == math.inf
    assert math.isnan(float(optclip.global_norm(jnp.array([jnp.nan]), ord=math.inf)))


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
def test_gradient_of_norm_is_finite_at_zero(p):
    g = jax.grad(lambda x: optclip.global_norm(x, ord=p))(jnp.zeros(4))
    assert np.all(np.isfinite(np.asarray(g)))


def test_gradient_of_norm_is_right():
    x = jnp.array([3.0, -4.0])
    np.testing.assert_allclose(jax.grad(optclip.global_norm)(x), [0.6, -0.8], rtol=1e-6)


@given(trees(dtypes=("float32", "bfloat16")), ords)
def test_leaf_norms_match_numpy(tree, p):
    got = optclip.leaf_norms(tree, ord=p)
    for k, x in tree.items():
        ref = pnorm(np_leaves([x]), p)
        if math.isinf(ref):
            assert math.isinf(float(got[k]))
        else:
            np.testing.assert_allclose(float(got[k]), ref, rtol=2e-5)


@pytest.mark.parametrize(
    "shape,axes",
    [((), None), ((5,), None), ((3, 4), (0,)), ((3, 3, 2, 4), (0, 1, 2)), ((2, 3, 4), (0, 1))],
)
def test_unitwise_norm_layouts(shape, axes):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    got = np.asarray(optclip.unitwise_norm(jnp.asarray(x)))
    ref = np.sqrt(np.sum(np.square(x.astype(np.float64)), axis=axes, keepdims=True))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_unitwise_norm_explicit_axis_and_overflow():
    x = jnp.full((3, 4), 1e20, jnp.float32)
    np.testing.assert_allclose(optclip.unitwise_norm(x, axis=1), np.full((3, 1), 2e20), rtol=1e-6)


@given(arrays("float32"))
def test_unitwise_norm_of_a_vector_is_its_l2_norm(x):
    x = x.reshape(-1)
    got = optclip.unitwise_norm(x)
    assert got.shape == (1,)
    ref = pnorm(np_leaves([x]), 2)
    if math.isinf(ref):
        assert math.isinf(float(got[0]))
    else:
        np.testing.assert_allclose(float(got[0]), ref, rtol=2e-5)


@pytest.mark.parametrize("bad", [0.5, 0, -1, float("nan"), "l2", None, True])
def test_bad_ord_raises(bad):
    with pytest.raises(ValueError, match="ord must be"):
        optclip.global_norm([jnp.ones(2)], ord=bad)


@given(st.floats(1.0, 50.0))
def test_general_p_between_l1_and_linf(p):
    x = [jnp.array([1.0, -2.0, 3.0])]
    n = float(optclip.global_norm(x, ord=p))
    assert 3.0 * (1 - 1e-6) <= n <= 6.0 * (1 + 1e-6)


def test_large_ord_does_not_overflow():
    # 5**100 overflows float32: the rescue divides by the largest magnitude for p > 2
    np.testing.assert_allclose(float(optclip.global_norm(jnp.array([1.0, -5.0, 3.0]), ord=100)),
                               np.linalg.norm([1.0, -5.0, 3.0], ord=100), rtol=1e-6)
    for p in (3, 7.5, 9):
        x = np.array([1e30, -2e30, 3e-5], np.float32)
        np.testing.assert_allclose(float(optclip.global_norm(jnp.asarray(x), ord=p)),
                                   np.linalg.norm(x.astype(np.float64), ord=p), rtol=1e-5)
    u, _ = optclip.clip_by_global_norm(1.0, ord=100).update(
        jnp.array([1.0, -5.0, 3.0]), optclip.clip_by_global_norm(1.0, ord=100).init(None))
    np.testing.assert_allclose(np.asarray(u), [0.2, -1.0, 0.6], rtol=1e-6)


def test_zero_size_leaves():
    z = jnp.zeros((0, 4))
    np.testing.assert_array_equal(np.asarray(optclip.unitwise_norm(z)), np.zeros((1, 4)))
    assert float(optclip.global_norm({"z": z, "a": jnp.array([3.0, 4.0])}, ord=math.inf)) == 4.0
    tx = optclip.agc(0.01)
    u, s = tx.update({"z": z, "a": jnp.ones(2)}, tx.init({"z": z, "a": jnp.ones(2)}),
                     {"z": z, "a": jnp.ones(2)})
    assert u["z"].shape == (0, 4) and np.isfinite(float(s.stats.grad_norm))


@pytest.mark.parametrize("p", [1, 2, 3.5, math.inf])
def test_nan_and_inf_are_flagged_for_every_ord(p):
    for bad, want in ((jnp.nan, np.isnan), (jnp.inf, np.isinf)):
        x = jnp.array([1.0, bad, 2.0])
        n, flag = jax.jit(lambda x: optclip.norms.global_norm_and_flag(x, p))(x)
        assert bool(flag) and want(float(n))


@pytest.mark.parametrize("ord", [1, 2])
def test_rescue_in_the_lowest_normal_binade(ord):
    # The largest magnitude in [2^-126, 2^-125): the rescale's way back was a subnormal
    # power of two, flushed to 0 on CPU, and the norm came out 0 (found in review).
    x = np.array([2.1e-38, 1.5e-38], np.float32)
    got = float(optclip.global_norm(jnp.asarray(x), ord=ord))
    np.testing.assert_allclose(got, np.linalg.norm(x.astype(np.float64), ord=ord), rtol=1e-6)


# f32 vectors that take the overflow rescue in each way: an overflowed sum, a sum of 0 (every
# term flushed), a positive sum below the underflow bound, on a small and on a large (reduced
# alone) array; and ones that need none. (391d8cc took the rescue's scales from the plain
# sums, with one fixed scale for every overflowed sum: its values held, its derivatives did
# not, and it was reverted.)
_CASES32 = {
    "one near the max": np.r_[3.3e38, np.ones(9)],
    "many large": np.full(4096, 1e20),
    "huge beside tiny": np.r_[1e30, -2e30, np.full(30, 1e-30)],
    "squares flushed": np.full(50, -1e-20),
    "near the smallest normal": np.full(10, 2e-38),
    "below the bound": np.full(24, 1e-17),
    "large, below the bound": np.full(70_001, 3e-17),
    "large, squares flushed": np.full(70_001, 1e-21),
    "large, many large": np.full(70_001, 3e17),
    "just past the overflow": np.full(7, 1e19),
    "zeros": np.zeros(12),
    "ordinary": np.linspace(-2, 3, 40),
}


def _ref(x, p):
    a = np.abs(np.asarray(x, np.float64))
    s = a.max()
    return 0.0 if s == 0 else s * math.fsum((a / s) ** p) ** (1 / p)


_gn = jax.jit(optclip.global_norm, static_argnames="ord")
_ln = jax.jit(optclip.leaf_norms, static_argnames="ord")


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("case", list(_CASES32))
def test_rescue_at_every_scale_matches_float64(case, p):
    x = np.asarray(_CASES32[case], np.float32)
    want = _ref(x, p)
    np.testing.assert_allclose(float(_gn([jnp.asarray(x)], ord=p)), want, rtol=2e-6)
    # per leaf, beside a leaf that needs no rescue and one of zeros; and unit-wise columns
    tree = {"x": jnp.asarray(x), "ones": jnp.ones((6, 4)), "zeros": jnp.zeros((6, 4))}
    got = _ln(tree, ord=p)
    np.testing.assert_allclose(float(got["x"]), want, rtol=2e-6)
    np.testing.assert_allclose(float(got["ones"]), 24 ** (1 / p), rtol=2e-6)
    assert float(got["zeros"]) == 0
    if p == 2:
        cols = jnp.stack([jnp.asarray(x), jnp.ones_like(x), jnp.zeros_like(x)], axis=1)
        u = np.asarray(optclip.unitwise_norm(cols))
        np.testing.assert_allclose(u[0], [want, math.sqrt(x.size), 0.0], rtol=2e-6)


def _d_norm(a, p):
    """d||a||_p / da in float64 (0 at a = 0)."""
    n = _ref(a, p)
    if n == 0:
        return np.zeros_like(a)
    return np.sign(a) * (np.abs(a) / n) ** (p - 1)


# The derivative through the rescue goes through the scale's powers of two as they are, and at
# the ends of float32's range an intermediate overflows or is flushed: at 2e-38 a cotangent of
# 1 comes out 0 (up / sqrt(s), up near 2**-126) and a tangent of 1 inf (t * down); near the
# float32 max a cotangent of 700 overflows (up near 2**127). Leaving the scales out of the chain
# by a pair of custom_jvps (bf167b5) made these right and the second derivatives wrong by the
# scale (helper-42), and was reverted. One custom_jvp for the whole norm (7238cac) made both
# exact, and was reverted too: its tangent, array by array, made the derivative's program
# compile far slower on many leaves (bench/results/cpu_onepass_exact/). Strict: a fix shows.
_EDGE = pytest.mark.xfail(strict=True, reason="the rescue's derivative at float32's ends")
_GRAD_CASES = [pytest.param(c, p, marks=_EDGE)
               if (c, p) in {("one near the max", 1.5), ("one near the max", 2.0),
                             ("near the smallest normal", 1.0),
                             ("near the smallest normal", 1.5),
                             ("near the smallest normal", 2.0)} else (c, p)
               for c in _CASES32 for p in (1.0, 1.5, 2.0)]


@pytest.mark.parametrize(("case", "p"), _GRAD_CASES)
def test_gradient_through_the_rescue_is_the_formulas(case, p):
    # Reverse mode with cotangents of 1 and 700, and forward mode, as a global norm, as a
    # leaf's norm and as a column's. With 391d8cc's fixed scale 2**-96 for an overflowed sum
    # "many large" and "just past the overflow" failed (found in review, helper-41); a scale
    # of 2**96 for a sum of 0, tried before 391d8cc and not committed, made the gradient 0
    # (through up**2 = 2**-192).
    x = np.asarray(_CASES32[case], np.float32)
    want = _d_norm(np.asarray(x, np.float64), p)
    t = np.linspace(1, 2, x.size)
    ones, zeros = jnp.ones(x.size), jnp.zeros(x.size)
    fs = [lambda v: optclip.global_norm(v, ord=p),
          lambda v: optclip.leaf_norms({"a": v, "b": jnp.ones(3)}, p)["a"]]
    if p == 2:
        fs.append(lambda v: optclip.unitwise_norm(jnp.stack([v, ones, zeros], axis=1))[0, 0])
    # Terms below 2**-126 once scaled are flushed, and so is their derivative: beside 2e30,
    # 1e-30's share of the gradient is 6e-31 (p = 1.5). Elements are held to the largest.
    atol = 1e-6 * np.abs(want).max()
    for f in fs:
        # under jit, as a training step takes it: one program for both cotangents and the
        # tangent (run op by op, these cases took 3x as long)
        @jax.jit
        def derivatives(v, tan, f=f):
            grad = jax.grad(lambda v, k: k * f(v))
            return grad(v, 1.0), grad(v, 700.0), jax.jvp(f, (v,), (tan,))[1]

        *gs, tan = derivatives(jnp.asarray(x), jnp.asarray(t, jnp.float32))
        for c, g in zip((1.0, 700.0), gs, strict=True):
            np.testing.assert_allclose(np.asarray(g), c * want, rtol=2e-5, atol=c * atol)
        np.testing.assert_allclose(float(tan), np.dot(want, t), rtol=2e-5)


@pytest.mark.parametrize(("scale", "p"), [
    (1e-37, 1.0), (1e-37, 2.0), pytest.param(1e-37, 3.0, marks=_EDGE), (1e-25, 3.0),
    (1.0, 2.0), (1e25, 2.0), pytest.param(1e37, 1.0, marks=_EDGE),
    pytest.param(1e37, 2.0, marks=_EDGE), pytest.param(1e37, 3.0, marks=_EDGE)])
def test_gradient_of_combined_norms(scale, p):
    # combine_norms (the stats' global norm from per-unit norms) rescales as the norms do, and
    # shares their derivative's limit at float32's ends (above).
    a = np.array([2.0, -3.0, 1.0]) * scale
    want = _d_norm(a, p)
    f = lambda v: optclip.norms.combine_norms(v, p)  # noqa: E731
    for c in (1.0, 700.0):
        g = jax.grad(lambda v, c=c: c * f(v))(jnp.asarray(a, jnp.float32))
        np.testing.assert_allclose(np.asarray(g), c * want, rtol=2e-5)
    t = np.array([1.0, 2.0, 3.0])  # (not orthogonal to a: the tangent would cancel to 0)
    _, tan = jax.jvp(f, (jnp.asarray(a, jnp.float32),), (jnp.asarray(t, jnp.float32),))
    np.testing.assert_allclose(float(tan), np.dot(want, t), rtol=2e-5)


@pytest.mark.parametrize("p", [1.0, 2.0])
@pytest.mark.parametrize("scale", [1e300, 1e-170, 1e-155, 1e-300])
def test_float64_rescue_matches(scale, p):
    with jax.enable_x64(True):
        x = np.linspace(1, 2, 33) * scale
        want = _ref(x, p)
        got = optclip.leaf_norms({"x": jnp.asarray(x), "z": jnp.zeros(3, jnp.float64)}, p)
        np.testing.assert_allclose(float(got["x"]), want, rtol=1e-12)
        np.testing.assert_allclose(float(optclip.global_norm(jnp.asarray(x), p)), want,
                                   rtol=1e-12)


@pytest.mark.parametrize("p", [3, 200.0])
def test_ord_above_2_near_the_float32_max(p):
    # For p > 2 the rescue divided by the largest magnitude; XLA took x / max as x * (1 / max),
    # a subnormal flushed to 0 above 2^126, and the norm came out 0 (found in review).
    x = jnp.array([3.3e38, 1.0])
    want = 3.3e38
    np.testing.assert_allclose(float(optclip.leaf_norms({"a": x}, p)["a"]), want, rtol=1e-6)
    big = {"a": x, "b": jnp.ones(70_000)}  # a leaf above SMALL_LEAF: reduced on its own
    np.testing.assert_allclose(float(optclip.global_norm(big, p)), want, rtol=1e-6)
    cols = jnp.array([[3.3e38, 1.0], [1.0, 2e38]])
    np.testing.assert_allclose(np.asarray(optclip.norms.norm_core([cols], p, axes=[0])[0][0]),
                               [[3.3e38, 2e38]], rtol=1e-6)


@pytest.mark.parametrize("x", [[3e30, -4e30], [3e-30, 4e-30], [3.3e38, 1.0]])
def test_gradient_of_ord_3_through_the_rescue(x):
    # d||x||_3 / dx = sign(x) x^2 / ||x||^2. The plain sum of cubes, computed on every step,
    # overflows here: its derivative was inf, its cotangent 0, and the gradient NaN.
    x64 = np.array(x, np.float64)
    want = np.sign(x64) * x64**2 / np.linalg.norm(x64, 3) ** 2
    for f in (lambda v: optclip.global_norm(v, ord=3),
              lambda v: optclip.leaf_norms({"a": v}, 3)["a"]):
        np.testing.assert_allclose(np.asarray(jax.grad(f)(jnp.array(x))), want, rtol=1e-5,
                                   atol=1e-30)


def _many_leaf_layout(with_shapes: bool = False):
    """A layout of 131 arrays, interleaved: 70 with one unit each, 40 with 3 units, 12 with 8
    (in two shapes), 6 empty, and 3 with 5 units."""
    kinds = ([((4,), None)] * 70 + [((6, 3), 0)] * 40 + [((2, 8), 0)] * 8
             + [((1, 1, 8), (0, 1))] * 4 + [((0, 2), 1)] * 6 + [((7, 5), 0)] * 3)
    order = np.random.default_rng(2).permutation(len(kinds))
    vals = [jax.ShapeDtypeStruct(kinds[i][0], jnp.float32) for i in order]
    lay = _n.layout_of(vals, [kinds[i][1] for i in order])
    return (lay, [v.shape for v in vals]) if with_shapes else lay


def test_split_by_gather_equals_slices_bit_for_bit():
    # Per-unit results reach their arrays by a gather on XLA:CPU (a slice per array compiled
    # as a kernel of its own). Every value must arrive exactly, and another array's NaN or
    # inf must not leak into this one's.
    lay = _many_leaf_layout()
    rng = np.random.default_rng(0)
    flat = rng.standard_normal(lay.total).astype(np.float32) * np.float32(1e3)
    flat[::7] = np.float32(3.4e38)
    flat[3::11] = np.float32(1.2e-38)
    flat[5::13] = np.nan
    flat[6::17] = np.inf
    flat[8::19] = -np.inf
    flat = jnp.asarray(flat)
    got = jax.jit(lambda v: _n._split_gathered(v, lay, None))(flat)
    want = _n._split_sliced(flat, lay)
    assert len(got) == len(want) == 131
    for g, w, shape in zip(got, want, lay.shapes, strict=True):
        assert g.shape == w.shape == shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    # at the arrays' own shapes (full=, for factors that scale them): a small array's part
    # comes broadcast to its shape by a gather of an index per element (an array of one
    # unit reads a copy of it for its last element); a scalar, a one-element array and one
    # above FULL_GATHER elements keep their part, which broadcasts
    _, shapes = _many_leaf_layout(with_shapes=True)
    extra = [((), None), ((1,), None), ((1, 3), 1), ((_n.FULL_GATHER + 1,), None),
             ((2, _n.FULL_GATHER), 1), ((_n.FULL_GATHER, 1), 1), ((2, 3, 4), 0)]
    vals = [jax.ShapeDtypeStruct(sh, jnp.float32) for sh, _ in extra]
    for lay_j, shapes_j, v in ((lay, shapes, flat), (_n.layout_of(vals, [a for _, a in extra]),
                                                      [sh for sh, _ in extra], None)):
        if v is None:
            v = jnp.asarray(rng.standard_normal(lay_j.total).astype(np.float32))
            v = v.at[1].set(jnp.nan).at[3].set(jnp.inf)
        got = jax.jit(lambda u, lay_j=lay_j, shapes_j=shapes_j: _n._split_gathered(
            u, lay_j, shapes_j))(v)
        whole = jax.jit(lambda u, lay_j=lay_j, shapes_j=shapes_j: _n.split_flat(
            u, lay_j, full=shapes_j))(v)
        # (and the other platforms' branch, as split_flat traces it: parts at full shape too)
        other = _n._split_sliced(v, lay_j, shapes_j)
        for g, h, w, o, shape, kshape, k in zip(got, whole, _n._split_sliced(v, lay_j), other,
                                                shapes_j, lay_j.shapes, lay_j.n_units,
                                                strict=True):
            small = k > 0 and 2 <= int(np.prod(shape)) <= _n.FULL_GATHER
            assert g.shape == h.shape == o.shape == (shape if small else kshape)
            np.testing.assert_array_equal(np.asarray(g), np.broadcast_to(np.asarray(w), g.shape))
            np.testing.assert_array_equal(np.asarray(h), np.asarray(g))
            np.testing.assert_array_equal(np.asarray(o), np.asarray(g))
    # the public split takes the gather on this (CPU) backend, from the vector written out
    # behind a lax.cond whose predicate reads the first element: NaN there too
    split = jax.jit(lambda v: _n.split_flat(v, lay))
    for first in (flat[0], jnp.nan, -jnp.inf):
        v = flat.at[0].set(first)
        for g, w in zip(split(v), _n._split_sliced(v, lay), strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_derivatives_through_the_split_at_full_shape():
    # On XLA:CPU a small array's part comes at its full shape by a gather of an index per
    # element. That gather's transpose, a scatter-add, summed up to 4,096 cotangents into one
    # unit one after another: gradients through clippy 6x further from float64 (review,
    # helper-44), here 1.8e-6 relative. The part's tangent is now its units broadcast, whose
    # transpose is a reduction, as before the gather: 5.2e-8.
    shapes = [(4096,), (1, 4096), (64, 64), (2, 1), (5,)]
    axes = [None, None, 0, None, None]
    lay = _n.layout_of([jax.ShapeDtypeStruct(sh, jnp.float32) for sh in shapes], axes)
    rng = np.random.default_rng(0)
    cs = [rng.standard_normal(sh).astype(np.float32) + np.float32(1.0) for sh in shapes]

    def loss(flat):
        parts = _n.split_flat(flat, lay, full=shapes)
        return sum(jnp.sum(jnp.asarray(c) * q) for c, q in zip(cs, parts, strict=True))

    flat = jnp.ones((lay.total,), jnp.float32)
    got = np.asarray(jax.jit(jax.grad(loss))(flat), np.float64)
    want = np.concatenate([np.ravel(c.astype(np.float64).sum(axis=ax))
                           for c, ax in zip(cs, axes, strict=True)])
    np.testing.assert_allclose(got, want, rtol=3e-7)
    # forward mode: each part's tangent is its units' tangents broadcast
    t = jnp.asarray(rng.standard_normal(lay.total).astype(np.float32))
    _, tan = jax.jvp(lambda v: _n.split_flat(v, lay, full=shapes), (flat,), (t,))
    for q, sh, want_q in zip(tan, shapes, _n._split_sliced(t, lay), strict=True):
        assert q.shape == sh
        np.testing.assert_array_equal(np.asarray(q), np.broadcast_to(np.asarray(want_q), sh))
    # and a second derivative: the part is linear in the vector
    h = jax.hessian(lambda v: jnp.sum(_n.split_flat(v, lay, full=shapes)[0] ** 2))(flat)
    assert float(h[0, 0]) == 2 * 4096 and float(jnp.sum(jnp.abs(h))) == 2 * 4096


def test_leaf_norms_of_many_leaves_keep_a_nan_to_its_leaf():
    rng = np.random.default_rng(1)
    tree = {f"l{i:03d}": jnp.asarray(rng.standard_normal((5, 3)).astype(np.float32) * (i + 1))
            for i in range(80)}
    tree["l007"] = tree["l007"].at[1, 1].set(jnp.nan)
    tree["l040"] = tree["l040"].at[0, 2].set(jnp.inf)
    tree["l041"] = jnp.full((5, 3), 1e30, jnp.float32)  # overflows a plain sum of squares
    for got in (optclip.leaf_norms(tree), jax.jit(optclip.leaf_norms)(tree)):
        for k, x in tree.items():
            if k == "l007":
                assert np.isnan(float(got[k]))
            elif k == "l040":
                assert np.isinf(float(got[k]))
            else:
                np.testing.assert_allclose(float(got[k]), pnorm(np_leaves([x]), 2.0), rtol=2e-6)


# An all-zero unit (a frozen parameter, a dead channel) asks for the rescue at every step: its
# sum, 0, is below the sum under which small terms may have been lost. The rescue's max shows
# that it is 0; the second pass, over every array, runs only when another unit needs it.
def _zero_mix(extra):
    rng = np.random.default_rng(5)
    tree = {f"l{i:02d}": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
            for i in range(12)}
    tree["big"] = jnp.asarray(rng.standard_normal((300, 260)), jnp.float32)  # reduced alone
    tree["l03"] = jnp.zeros((6, 4), jnp.float32)
    tree["big0"] = jnp.zeros((300, 260), jnp.float32)
    tree.update(extra)
    return tree


_ZERO_MIXES = {
    "zeros only": {},
    "and a tiny leaf": {"l05": jnp.full((6, 4), 1e-30, jnp.float32)},
    "and a huge leaf": {"l05": jnp.full((6, 4), 1e30, jnp.float32)},
    "and a tiny unit": {"l05": jnp.ones((6, 4), jnp.float32).at[:, 1].set(1e-30)},
    "and a NaN": {"l05": jnp.ones((6, 4), jnp.float32).at[2, 1].set(jnp.nan)},
    "and an inf": {"l05": jnp.ones((6, 4), jnp.float32).at[2, 1].set(jnp.inf)},
}


# shared across the mixes (one tree structure): compiled once per ord, not once per case
_leaf_norms_jit = jax.jit(optclip.leaf_norms, static_argnames="ord")
_unit_norms_jit = jax.jit(lambda t: [optclip.unitwise_norm(x) for x in jax.tree.leaves(t)])


@pytest.mark.parametrize("mix", list(_ZERO_MIXES))
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_leaf_and_unit_norms_with_all_zero_leaves_match_numpy(mix, p):
    tree = _zero_mix(_ZERO_MIXES[mix])
    got = _leaf_norms_jit(tree, ord=p)
    for k, x in tree.items():
        a = np.asarray(x, np.float64)
        if np.isnan(a).any():
            assert np.isnan(float(got[k])), k
        elif np.isinf(a).any():
            assert np.isinf(float(got[k])), k
        else:
            np.testing.assert_allclose(float(got[k]), pnorm([a], p), rtol=2e-5, err_msg=k)
    # unit-wise (AGC's units: one per output column), every leaf of the mix at once
    units = _unit_norms_jit(tree)
    for x, u in zip(jax.tree.leaves(tree), units, strict=True):
        a = np.asarray(x, np.float64)
        want = np.sqrt(np.sum(a * a, axis=0, keepdims=True))
        finite = np.isfinite(a).all(axis=0, keepdims=True)
        np.testing.assert_allclose(np.asarray(u)[finite], want[finite], rtol=2e-5)
        assert not np.isfinite(np.asarray(u)[~finite]).any()


def _second_passes(monkeypatch, fn, *args) -> int:
    """How many arrays the rescue's second pass (the sum of rescaled terms) read at run time."""
    seen = []
    inner = optclip.norms._scaled_terms

    def counting(v, scale, p):
        if jnp.ndim(v) > 1:  # the arrays' terms (a vector of per-leaf norms is combined too)
            jax.debug.callback(lambda: seen.append(1))
        return inner(v, scale, p)

    monkeypatch.setattr(optclip.norms, "_scaled_terms", counting)
    # a fresh function, so that no executable traced under another hook is reused
    jax.block_until_ready(jax.jit(lambda *a: fn(*a))(*args))
    jax.effects_barrier()
    return len(seen)


def test_all_zero_leaves_skip_the_rescues_second_pass(monkeypatch):
    # Before (67cbf25), a zero leaf took both of the rescue's passes at every step: with a
    # quarter of the leaves zero, the per-leaf chains + adam ran at 1.35-1.64x their step
    # (python -m bench.zero_probe; bench/results/cpu_zero_leaves/).
    assert _second_passes(monkeypatch, optclip.leaf_norms, _zero_mix({})) == 0
    assert _second_passes(monkeypatch, optclip.leaf_norms,
                          _zero_mix(_ZERO_MIXES["and a tiny leaf"])) > 0
    tx = optclip.clip_by_leaf_norm(1.0)
    tree = _zero_mix({})
    assert _second_passes(monkeypatch, lambda g: tx.update(g, tx.init(g))[0], tree) == 0


@pytest.mark.parametrize("half", [jnp.float16, jnp.bfloat16])
def test_a_weak_float32_leaf_beside_a_half_precision_one_keeps_its_precision(half):
    # jax.grad of a Python-float parameter is a weak float32. Concatenated raw with a float16
    # leaf, it was cast to float16 (1e5 to inf: the update zeroed as non-finite), with a
    # bfloat16 one it lost its digits (1.001 to 1.0).
    t = 1e5 if half == jnp.float16 else 1.001
    g = {"t": jnp.asarray(t), "w": jnp.ones(3, half)}
    assert g["t"].weak_type
    want = math.sqrt(3 + t * t)
    for p in (1, 2, 3, math.inf):
        ref = {1: 3 + t, 2: want, 3: (3 + t ** 3) ** (1 / 3), math.inf: max(1.0, t)}[p]
        np.testing.assert_allclose(float(optclip.global_norm(g, p)), ref, rtol=1e-6)
    tx = optclip.clip_by_global_norm(2 * want)
    out, state = jax.jit(tx.update)(g, tx.init(g))
    assert not bool(state.stats.nonfinite) and not bool(state.stats.clipped)
    np.testing.assert_allclose(float(state.stats.grad_norm), want, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["w"], np.float32), np.ones(3, np.float32))


def _hessian_ref(a, p):
    """d2||a||_p / da2 in float64: (p-1)/n (diag(r**(p-2)) - g g^T), r = |a|/n, g the
    gradient."""
    n = _ref(a, p)
    r = np.abs(a) / n
    g = np.sign(a) * r ** (p - 1)
    return (p - 1) / n * (np.diag(r ** (p - 2)) - np.outer(g, g))


@functools.cache
def _hessians(p):
    """The Hessians of a global norm, a leaf's norm and ``combine_norms`` of one vector, in one
    program per ``p`` that every scale shares (op by op, each took seconds)."""
    fs = (lambda v: optclip.global_norm(v, ord=p),
          lambda v: optclip.leaf_norms({"a": v, "b": jnp.ones(3)}, p)["a"],
          lambda v: optclip.norms.combine_norms(v, p))
    return jax.jit(lambda x: tuple(jax.hessian(f)(x) for f in fs))


@pytest.mark.parametrize("p", [2.0, 3.0])
@pytest.mark.parametrize("scale", [1e-25, 1.0, 1e25])
def test_second_derivatives_of_the_norms(scale, p):
    # Second derivatives (meta-gradients through a clipper's norm, Hessian-vector products):
    # bf167b5's custom_jvp pair, which left the rescue's scales out of the first derivative,
    # made them wrong by the scale, at ordinary magnitudes too for combine_norms (which always
    # rescales: 0.153 for 0.0191 at [20, -30, 10]); found in review (helper-42).
    a = np.array([2.0, -3.0, 1.0, 0.5]) * scale
    want = _hessian_ref(a, p)
    x = jnp.asarray(a, jnp.float32)
    for h in _hessians(p)(x):
        h = np.asarray(h, np.float64)
        np.testing.assert_allclose(h, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
