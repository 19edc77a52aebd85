"""layer_axis: scanned (stacked) layers are clipped as the same layers unrolled.

The reference for every clipper is the same clipper *without* ``layer_axis``
applied to the unrolled model (L separate layers, each its own leaves); the
reference for ``leaf_norms`` is a NumPy per-layer norm. The scanned model is
an ``nnx.scan``-ed residual MLP block; its unrolled twin is a Python loop over
L single blocks holding the very same weights.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optclip
from optclip import layers as _layers

D, IN, OUT = 8, 4, 2


class Block(nnx.Module):
    def __init__(self, rngs):
        self.ln = nnx.LayerNorm(D, rngs=rngs)
        self.lin = nnx.Linear(D, D, rngs=rngs)
        self.proj = nnx.LinearGeneral(D, (2, 4), rngs=rngs)  # a 3-D kernel (in, 2, 4)

    def __call__(self, x):
        h = self.lin(self.ln(x))
        return x + nnx.gelu(self.proj(h).reshape(*x.shape[:-1], D))


class Scanned(nnx.Module):
    def __init__(self, n_layers, rngs):
        self.embed = nnx.Linear(IN, D, rngs=rngs)

        @nnx.split_rngs(splits=n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(rngs)

        self.layers = make(rngs)
        self.head = nnx.Linear(D, OUT, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return self.head(body(x, self.layers))


L = 3


@functools.cache
def model_data():
    """(stacked params, per-step stacked grads, per-step unrolled grads), as plain dicts.

    The stacked grads come from the nnx.scan model. The unrolled ones are its stacked leaves
    split into L separate leaves (so that both clippers see bit-identical inputs);
    ``model_grads_unrolled`` holds the grads of the unrolled model itself, which agree with
    them to float tolerance (checked below)."""
    model = Scanned(L, nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    block, embed, head = (Block(nnx.Rngs(1)), nnx.Linear(IN, D, rngs=nnx.Rngs(2)),
                          nnx.Linear(D, OUT, rngs=nnx.Rngs(3)))

    def merge(template, pure):
        graphdef, state = nnx.split(template)
        nnx.replace_by_pure_dict(state, pure)
        return nnx.merge(graphdef, state)

    def unrolled_loss(up, x, y):
        h = merge(embed, up["embed"])(x)
        for i in range(L):
            h = merge(block, up[f"layer_{i}"])(h)
        return jnp.mean((merge(head, up["head"])(h) - y) ** 2)

    def scanned_loss(model, x, y):
        return jnp.mean((model(x) - y) ** 2)

    up = unroll(params)
    # compiled once each, then run for the six steps (eagerly, every op dispatched anew)
    scanned_grad = nnx.jit(nnx.grad(scanned_loss))
    unrolled_grad = jax.jit(jax.grad(unrolled_loss))
    stacked, from_model = [], []
    for step in range(6):
        kx, ky = jax.random.split(jax.random.key(step))
        x = jax.random.normal(kx, (5, IN)) * (1 + step)
        y = jax.random.normal(ky, (5, OUT)) * 3
        g = nnx.to_pure_dict(scanned_grad(model, x, y))
        spike = 40.0 if step == 4 else 1.0
        stacked.append(jax.tree.map(lambda a: a * spike, g))  # noqa: B023
        gu = unrolled_grad(up, x, y)
        from_model.append(jax.tree.map(lambda a: a * spike, gu))  # noqa: B023
    MODEL_UNROLLED[:] = from_model
    return params, stacked, [unroll(g) for g in stacked]


MODEL_UNROLLED = []


def unroll(tree, axis=0):
    """{"embed", "head", "layer_i": ...} from {"embed", "head", "layers": stacked}."""
    out = {k: v for k, v in tree.items() if k != "layers"}
    n = jax.tree.leaves(tree["layers"])[0].shape[axis]
    for i in range(n):
        out[f"layer_{i}"] = jax.tree.map(lambda a: jnp.take(a, i, axis=axis),  # noqa: B023
                                         tree["layers"])
    return out


def move(tree, axis):
    """The stacked tree with its layer axis moved from 0 to ``axis`` (MaxText's is 1)."""
    if axis == 0:
        return tree
    return {k: (jax.tree.map(lambda a: jnp.moveaxis(a, 0, axis), v) if k == "layers" else v)
            for k, v in tree.items()}


PREFIX = {"embed": None, "head": None, "layers": 0}


def prefix(axis):
    return {"embed": None, "head": None, "layers": axis}


def by_path(axis):
    def f(path, leaf):
        del leaf
        return axis if jax.tree_util.keystr(path).startswith("['layers']") else None

    return f


def assert_matches_unrolled(stacked_out, unrolled_out, axis, rtol=1e-6, atol=1e-7):
    got = unroll(stacked_out, axis)
    assert jax.tree.structure(got) == jax.tree.structure(unrolled_out)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                            jax.tree.leaves(unrolled_out), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def assert_stats_equal(s1, s2, rtol=1e-6):
    s1, s2 = optclip.stats(s1), optclip.stats(s2)
    assert s1.keys() == s2.keys()
    for k in s1:
        np.testing.assert_allclose(np.asarray(s1[k]), np.asarray(s2[k]), rtol=rtol, err_msg=k)


def per_layer_norms_np(unrolled, p=2.0):
    """NumPy norms of every leaf of the unrolled tree."""
    out = {}
    for path, a in jax.tree_util.tree_flatten_with_path(unrolled)[0]:
        a = np.asarray(a, np.float64).ravel()
        out[jax.tree_util.keystr(path)] = (np.abs(a).max() if p == math.inf
                                           else np.sum(np.abs(a) ** p) ** (1 / p))
    return out


# --- the model built both ways -------------------------------------------------------------

def test_scanned_and_unrolled_models_have_the_same_gradients():
    _, stacked, _ = model_data()
    for g_s, g_u in zip(stacked, MODEL_UNROLLED, strict=True):
        scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(g_u))
        assert_matches_unrolled(g_s, g_u, 0, rtol=1e-4, atol=1e-5 * scale)
    # and the stacked leaves really hold L layers
    assert stacked[0]["layers"]["lin"]["kernel"].shape == (L, D, D)
    assert stacked[0]["layers"]["proj"]["kernel"].shape == (L, D, 2, 4)


def thresholds(unrolled, p=2.0):
    """A threshold between the smallest and the largest layer norm: some layers clip."""
    return float(np.median(list(per_layer_norms_np(unrolled, p).values())))


# --- leaf_norms ------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [2, 1, math.inf])
@pytest.mark.parametrize("axis", [0, 1])
def test_leaf_norms_per_layer_match_numpy(axis, p):
    _, stacked, _ = model_data()
    g = move(stacked[0], axis)
    got = optclip.leaf_norms(g, p, layer_axis=prefix(axis))
    for path, a in jax.tree_util.tree_flatten_with_path(g)[0]:
        key = jax.tree_util.keystr(path)
        n = got
        for k in path:
            n = n[k.key]
        a = np.asarray(a, np.float64)
        if key.startswith("['layers']"):
            rest = tuple(d for d in range(a.ndim) if d != axis)
            if p == math.inf:
                want = np.abs(a).max(axis=rest)
            else:
                want = np.sum(np.abs(a) ** p, axis=rest) ** (1 / p)
            assert n.shape == (L,), key
        else:
            want = np.abs(a).max() if p == math.inf else np.sum(np.abs(a) ** p) ** (1 / p)
            assert n.shape == (), key
        np.testing.assert_allclose(np.asarray(n), want, rtol=1e-5, err_msg=key)


def test_leaf_norms_without_layer_axis_unchanged():
    _, stacked, _ = model_data()
    a = optclip.leaf_norms(stacked[0])
    b = optclip.leaf_norms(stacked[0], layer_axis=None)
    assert all(np.shape(x) == () for x in jax.tree.leaves(a))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert float(x) == float(y)


# --- the static clippers -----------------------------------------------------------------------

LAYER_AXIS_FORMS = {
    "prefix": prefix,
    "callable": by_path,
}


# Each clipper on both layer axes; the two ways of giving layer_axis alternate between them
# (test_layer_axis_forms_agree checks that they resolve alike).
@pytest.mark.parametrize("clipper,axis,form", [
    ("leaf_norm", 0, "prefix"), ("leaf_norm", 1, "callable"),
    ("leaf_norm_l1", 0, "callable"), ("leaf_norm_l1", 1, "prefix"),
    ("block_rms", 0, "prefix"), ("block_rms", 1, "callable")])
def test_static_clippers_equal_unrolled(clipper, axis, form):
    _, stacked, unrolled = model_data()
    g_s, g_u = move(stacked[1], axis), unrolled[1]
    if clipper == "block_rms":
        rms = {k: v / math.sqrt(np.size(a)) for (k, v), a in zip(
            per_layer_norms_np(g_u).items(), jax.tree.leaves(g_u), strict=True)}
        t = float(np.median(list(rms.values())))
        make = lambda **kw: optclip.clip_by_block_rms(t, **kw)  # noqa: E731
    else:
        p = 1 if clipper == "leaf_norm_l1" else 2
        t = thresholds(g_u, p)
        make = lambda **kw: optclip.clip_by_leaf_norm(t, ord=p, **kw)  # noqa: E731
    tx_s = make(layer_axis=LAYER_AXIS_FORMS[form](axis))
    tx_u = make()
    u_s, s_s = jax.jit(tx_s.update)(g_s, tx_s.init(g_s))
    u_u, s_u = jax.jit(tx_u.update)(g_u, tx_u.init(g_u))
    assert_matches_unrolled(u_s, u_u, axis)
    assert_stats_equal(s_s, s_u)
    # not vacuous: some layers of one stacked leaf were clipped, others were not
    assert bool(optclip.stats(s_s)["clipped"])
    norms = jax.jit(lambda t: optclip.leaf_norms(t, layer_axis=prefix(axis)))
    after, before = norms(u_s)["layers"], norms(g_s)["layers"]
    ratios = [np.asarray(after[k][n]) / np.asarray(before[k][n])
              for k in g_s["layers"] for n in g_s["layers"][k]]
    assert any(np.any(r < 0.999) and np.any(r > 0.999) for r in ratios)


def test_without_layer_axis_the_stack_is_one_tensor():
    # the bug layer_axis fixes: without it the whole stack is clipped as one "layer"
    _, stacked, unrolled = model_data()
    t = thresholds(unrolled[1])
    tx = optclip.clip_by_leaf_norm(t)
    u_s, _ = jax.jit(tx.update)(stacked[1], tx.init(None))
    u_u, _ = jax.jit(tx.update)(unrolled[1], tx.init(None))
    with pytest.raises(AssertionError):
        assert_matches_unrolled(u_s, u_u, 0)


def test_int_layer_axis_on_an_all_stacked_tree():
    # an int applies to every leaf of 2+ dims; the 1-D leaves (none here but stacked
    # biases are 2-D) are not stacked
    _, stacked, unrolled = model_data()
    g_s = {"layers": stacked[2]["layers"], "extra": jnp.array([3.0, 4.0])}
    g_u = {k: v for k, v in unrolled[2].items() if k.startswith("layer_")}
    g_u["extra"] = jnp.array([3.0, 4.0])
    t = thresholds(g_u)
    tx, ref = optclip.clip_by_leaf_norm(t, layer_axis=0), optclip.clip_by_leaf_norm(t)
    u_s, s_s = tx.update(g_s, tx.init(None))
    u_u, s_u = ref.update(g_u, ref.init(None))
    np.testing.assert_allclose(np.asarray(u_s["extra"]), np.asarray(u_u["extra"]), rtol=1e-6)
    assert_matches_unrolled({"layers": u_s["layers"]},
                            {k: v for k, v in u_u.items() if k != "extra"}, 0)
    assert_stats_equal(s_s, s_u)


def test_schedule_and_array_thresholds():
    _, stacked, unrolled = model_data()
    t = thresholds(unrolled[1])
    sched = optax.linear_schedule(t, t / 4, 2)
    for thr in (sched, jnp.asarray(t)):
        tx_s = optclip.clip_by_leaf_norm(thr, layer_axis=PREFIX)
        tx_u = optclip.clip_by_leaf_norm(thr)
        s_s, s_u = tx_s.init(None), tx_u.init(None)
        for step in (1, 2, 3):
            u_s, s_s = jax.jit(tx_s.update)(stacked[step], s_s)
            u_u, s_u = jax.jit(tx_u.update)(unrolled[step], s_u)
            assert_matches_unrolled(u_s, u_u, 0)
            assert_stats_equal(s_s, s_u)


def test_inject_hyperparams_with_static_layer_axis():
    _, stacked, unrolled = model_data()
    g = {"layers": stacked[1]["layers"]}
    t = thresholds(unrolled[1])
    tx = optax.inject_hyperparams(optclip.clip_by_leaf_norm, static_args=("layer_axis",))(
        max_norm=t, layer_axis=0)
    state = tx.init(g)
    u, state = jax.jit(tx.update)(g, state)
    ref = optclip.clip_by_leaf_norm(t, layer_axis=0)
    u_ref, _ = ref.update(g, ref.init(None))
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    state.hyperparams["max_norm"] = jnp.asarray(1e6)
    u2, state = jax.jit(tx.update)(g, state)
    for a, b in zip(jax.tree.leaves(u2), jax.tree.leaves(g), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a callable layer_axis goes through static_args as well
    tx = optax.inject_hyperparams(optclip.clip_by_block_rms, static_args=("layer_axis",))(
        threshold=0.1, layer_axis=lambda path, x: 0)
    jax.jit(tx.update)(g, tx.init(g))


def test_inject_hyperparams_without_static_args_says_what_to_do():
    tx = optax.inject_hyperparams(optclip.clip_by_leaf_norm)(max_norm=1.0, layer_axis=0)
    with pytest.raises(ValueError, match="static_args"):
        tx.init({"w": jnp.ones((2, 2))})


# --- AGC -----------------------------------------------------------------------------------

@pytest.mark.parametrize("axis", [0, 1])
def test_agc_with_params_equals_unrolled(axis):
    params, stacked, unrolled = model_data()
    p_s, p_u = move(params, axis), unroll(params)
    g_s, g_u = move(stacked[1], axis), unrolled[1]
    c = agc_median_ratio(g_u, p_u)
    tx_s, tx_u = optclip.agc(c, layer_axis=prefix(axis)), optclip.agc(c)
    u_s, s_s = jax.jit(tx_s.update)(g_s, tx_s.init(p_s), p_s)
    u_u, s_u = jax.jit(tx_u.update)(g_u, tx_u.init(p_u), p_u)
    assert_matches_unrolled(u_s, u_u, axis)
    assert_stats_equal(s_s, s_u)
    assert bool(optclip.stats(s_u)["clipped"]) and float(optclip.stats(s_u)["scale"]) > 0.05
    # and it differs from AGC over the whole stack (units spanning layers)
    tx_w = optclip.agc(c)
    u_w, _ = jax.jit(tx_w.update)(g_s, tx_w.init(p_s), p_s)
    with pytest.raises(AssertionError):
        assert_matches_unrolled(u_w, u_u, axis)


def agc_median_ratio(g, w):
    """A clipping factor at which about half of the units clip (AGC's test is not vacuous)."""
    def unit(a):  # in NumPy, over the units optclip.unitwise_norm takes
        ax = optclip.norms.unitwise_axes(a)
        return np.sqrt(np.sum(np.square(np.asarray(a, np.float64)), axis=ax,
                              keepdims=ax is not None))

    ratios = [np.ravel(unit(a) / np.maximum(unit(b), 1e-3))
              for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w), strict=True)]
    return float(np.median(np.concatenate(ratios)))


def test_agc_unit_axes_are_per_layer():
    # per-layer (in, out) kernel: reduce "in"; per-layer conv (h, w, in, out): all but out
    assert _layers.unit_axes(jnp.zeros((3, 8, 8)), 0) == (1,)
    assert _layers.unit_axes(jnp.zeros((8, 3, 8)), 1) == (0,)
    assert _layers.unit_axes(jnp.zeros((3, 3, 5, 4, 8)), 0) == (1, 2, 3)
    assert _layers.unit_axes(jnp.zeros((3, 3, 5, 4, 8)), 4) == (0, 1, 2)
    assert _layers.unit_axes(jnp.zeros((3, 8)), 0) == (1,)  # a stacked bias: one unit/layer
    assert _layers.unit_axes(jnp.zeros((5,)), 0) == ()  # stacked scalars: one unit each
    assert _layers.unit_axes(jnp.zeros((3, 4, 5, 6)), 0, axis=-1) == (3,)  # explicit, per layer


def test_agc_explicit_axis_is_per_layer():
    params, stacked, unrolled = model_data()
    p_s, p_u = params, unroll(params)
    c = agc_median_ratio(unrolled[2], p_u)
    tx_s, tx_u = optclip.agc(c, axis=-1, layer_axis=PREFIX), optclip.agc(c, axis=-1)
    u_s, s_s = jax.jit(tx_s.update)(stacked[2], tx_s.init(p_s), p_s)
    u_u, s_u = jax.jit(tx_u.update)(unrolled[2], tx_u.init(p_u), p_u)
    assert_matches_unrolled(u_s, u_u, 0)
    assert_stats_equal(s_s, s_u)


# --- AdaGC: per-layer EMA over several steps -----------------------------------------------------

def gamma_by_name(tree, gamma, layer_axis):
    """{(leaf path, layer): gamma entry}, with a stacked leaf's layers under their unrolled
    names, so that the stacked and unrolled states can be compared entry by entry."""
    las = _layers.resolve_layer_axes(layer_axis, tree) if layer_axis is not None else None
    out, i = {}, 0
    for j, (path, x) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
        key = jax.tree_util.keystr(path)
        la = None if las is None else las[j]
        if la is None:
            out[key] = float(gamma[i])
            i += 1
        else:
            for layer in range(x.shape[la]):
                out[key.replace("['layers']", f"['layer_{layer}']")] = float(gamma[i])
                i += 1
    assert i == gamma.shape[0]
    return out


@pytest.mark.parametrize("axis", [0, 1])
def test_adagc_per_layer_ema_equals_unrolled(axis):
    params, stacked, unrolled = model_data()
    p_s, p_u = move(params, axis), unroll(params)
    tx_s = optclip.adagc(warmup_steps=2, lambda_abs=1.0, layer_axis=prefix(axis))
    tx_u = optclip.adagc(warmup_steps=2, lambda_abs=1.0)
    s_s, s_u = tx_s.init(p_s), tx_u.init(p_u)
    n_tensors = 4 + 6 * L
    assert s_s.gamma.shape == (n_tensors,) == s_u.gamma.shape
    step_s, step_u = jax.jit(tx_s.update), jax.jit(tx_u.update)
    clipped_after_warmup = False
    for t in range(len(stacked)):
        u_s, s_s = step_s(move(stacked[t], axis), s_s)
        u_u, s_u = step_u(unrolled[t], s_u)
        assert_matches_unrolled(u_s, u_u, axis, rtol=2e-6)
        assert_stats_equal(s_s, s_u, rtol=2e-6)
        got = gamma_by_name(move(stacked[t], axis), s_s.gamma, prefix(axis))
        want = gamma_by_name(unrolled[t], s_u.gamma, None)
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=2e-6)
        clipped_after_warmup |= t >= 2 and bool(optclip.stats(s_s)["clipped"])
    assert clipped_after_warmup


def test_adagc_init_must_know_the_layout():
    params, stacked, _ = model_data()
    tx = optclip.adagc(layer_axis=PREFIX)
    with pytest.raises(ValueError, match="same layer_axis"):
        tx.update(stacked[0], optclip.adagc().init(params))
    with pytest.raises(ValueError, match="initialised with 0"):
        tx.update(stacked[0], tx.init(None))


# --- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,match", [
    (1.0, "must be a Python int"),
    (True, "must be a Python int"),
    ("0", "must be a Python int"),
    (jnp.asarray(0), "static_args"),
    ({"layers": 0.5}, r"layer_axis\['layers'\] is 0.5"),
])
def test_bad_layer_axis_raises_at_construction(bad, match):
    for make in (lambda: optclip.clip_by_leaf_norm(1.0, layer_axis=bad),
                 lambda: optclip.clip_by_block_rms(1.0, layer_axis=bad),
                 lambda: optclip.agc(layer_axis=bad), lambda: optclip.adagc(layer_axis=bad)):
        with pytest.raises(ValueError, match=match):
            make()
    with pytest.raises(ValueError, match=match):
        optclip.leaf_norms({"layers": jnp.ones((2, 2))}, layer_axis=bad)


def test_axis_out_of_range_names_the_leaf():
    g = {"a": {"k": jnp.ones((2, 3))}, "b": jnp.ones((2, 3, 4))}
    with pytest.raises(ValueError, match=r"out of range for the leaf at \['a'\]\['k'\]"):
        optclip.leaf_norms(g, layer_axis=2)
    with pytest.raises(ValueError, match=r"\['b'\]"):
        optclip.leaf_norms(g, layer_axis={"a": None, "b": -4})
    tx = optclip.clip_by_leaf_norm(1.0, layer_axis=lambda path, x: 5)
    with pytest.raises(ValueError, match=r"out of range .*\['a'\]\['k'\]"):
        tx.update(g, tx.init(None))
    with pytest.raises(ValueError, match="scalar leaf"):
        optclip.leaf_norms({"s": jnp.ones(())}, layer_axis=lambda path, x: 0)
    with pytest.raises(ValueError, match="must give an int"):
        optclip.leaf_norms(g, layer_axis=lambda path, x: "x")


def test_prefix_that_does_not_match_raises():
    g = {"a": jnp.ones((2, 3)), "b": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match="prefix of the updates"):
        optclip.leaf_norms(g, layer_axis={"a": 0})
    with pytest.raises(ValueError, match="prefix of the updates"):
        optclip.leaf_norms(g, layer_axis=[0, 0])
    with pytest.raises(ValueError, match="prefix of the updates"):
        tx = optclip.adagc(layer_axis={"c": 0, "a": 0})
        tx.init(g)


def test_layer_axis_forms_agree():
    # int, negative int, prefix (at any depth) and callable give the same layout
    g = {"w": jnp.ones((3, 4, 5)), "b": jnp.ones((3, 5)), "s": jnp.ones(5)}
    forms = [0, {"w": 0, "b": 0, "s": None}, {"w": 0, "b": 0, "s": 0},
             lambda path, x: 0 if x.ndim > 1 else None]
    want = [0, None, 0]  # leaf order b, s, w: the vector s is not stacked
    for f in forms:
        assert _layers.resolve_layer_axes(f, g) == want, f
    assert _layers.resolve_layer_axes({"w": -3, "b": -2, "s": None}, g) == want
    assert _layers.resolve_layer_axes(lambda path, x: 0, g) == [0, 0, 0]  # callable: 1-D too


# --- sharding: jit + NamedSharding, and shard_map with partition_specs ------------------------

pytestmark_sharding = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")

LS = 4  # layers in the sharded trees (split 4 ways along "pipe")
SHARD_SHAPES = {"embed": (IN, D), "head": (D, OUT), "head_b": (OUT,),
                "layers": {"kernel": (LS, D, D), "bias": (LS, D), "proj": (LS, D, 2, 4)}}


def shard_grads(step, axis):
    rng = np.random.default_rng(100 + step)
    spike = 30.0 if step == 3 else 1.0

    def leaf(shape, stacked):
        a = rng.normal(size=shape)
        if stacked:  # each layer its own scale, so that some layers clip and others do not
            a = a * np.array([0.3, 1.0, 3.0, 0.1])[:, None].reshape(
                (LS,) + (1,) * (len(shape) - 1))
        return jnp.asarray(a * spike, jnp.float32)

    g = {k: leaf(s, False) for k, s in SHARD_SHAPES.items() if k != "layers"}
    g["layers"] = {k: leaf(s, True) for k, s in SHARD_SHAPES["layers"].items()}
    return move(g, axis)


def shard_specs(axis, layer_sharded):
    pipe = "pipe" if layer_sharded else None
    stacked = {"kernel": P(pipe, "data", None if layer_sharded else "pipe"),
               "bias": P(pipe, "data"), "proj": P(pipe, "data", None, None)}
    if axis == 1:
        stacked = {k: P(*(s[1], s[0], *s[2:])) for k, s in stacked.items()}
    return {"embed": P(None, "data"), "head": P("data"), "head_b": P(), "layers": stacked}


SHARD_CLIPPERS = {
    "leaf_norm": lambda la, **kw: optclip.clip_by_leaf_norm(2.0, layer_axis=la, **kw),
    "block_rms": lambda la, **kw: optclip.clip_by_block_rms(0.5, layer_axis=la, **kw),
    "adagc": lambda la, **kw: optclip.adagc(warmup_steps=2, lambda_abs=5.0, layer_axis=la,
                                            **kw),
    "agc": lambda la, **kw: optclip.agc(0.05, layer_axis=la, **kw),
}


def run_steps(tx, axis, step_fn, steps=5):
    params = jax.tree.map(lambda a: a * 0 + 0.1, shard_grads(0, axis))
    state = tx.init(params)
    outs = []
    for t in range(steps):
        u, state = step_fn(shard_grads(t, axis), state, params)
        outs.append((jax.device_get(u), jax.device_get(optclip.stats(state)),
                     np.asarray(getattr(state, "gamma", 0.0))))
    return outs


def shard_layer_axes(axis):
    return prefix(axis) | {"head_b": None}


@functools.cache
def unsharded_run(name, axis):
    """The unsharded clipper's steps, computed once per clipper and layer axis (the sharded
    tests of every layout compare against it)."""
    tx = SHARD_CLIPPERS[name](shard_layer_axes(axis))
    return run_steps(tx, axis, jax.jit(tx.update))


def assert_runs_equal(got, want):
    for (u1, s1, g1), (u2, s2, g2) in zip(got, want, strict=True):
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
        for k in s2:
            np.testing.assert_allclose(np.asarray(s1[k]), np.asarray(s2[k]), rtol=1e-5,
                                       err_msg=k)
        np.testing.assert_allclose(g1, g2, rtol=1e-5)


def mesh_2d():
    return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("pipe", "data"))


SHARD_CASES = [(0, True), (0, False), (1, True)]


@pytestmark_sharding
@pytest.mark.parametrize("axis,layer_sharded", SHARD_CASES)
@pytest.mark.parametrize("name", ["leaf_norm", "adagc", "agc"])
def test_jit_named_sharding_equals_unsharded(name, axis, layer_sharded):
    mesh = mesh_2d()
    specs = shard_specs(axis, layer_sharded)
    la = shard_layer_axes(axis)
    tx = SHARD_CLIPPERS[name](la)
    want = unsharded_run(name, axis)
    assert any(bool(s["clipped"]) for _, s, _ in want)
    shard = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                         is_leaf=lambda x: isinstance(x, P))

    def step(g, s, p):
        return jax.jit(tx.update)(jax.device_put(g, shard), s, jax.device_put(p, shard))

    assert_runs_equal(run_steps(tx, axis, step), want)


@pytestmark_sharding
@pytest.mark.parametrize("name,axis,layer_sharded", [
    *[(n, a, ls) for n in ("adagc", "leaf_norm") for a, ls in SHARD_CASES],
    ("block_rms", 0, True), ("agc", 0, True), ("agc", 1, False)])
def test_shard_map_partition_specs_equals_unsharded(name, axis, layer_sharded):
    mesh = mesh_2d()
    specs = shard_specs(axis, layer_sharded)
    la = shard_layer_axes(axis)
    want = unsharded_run(name, axis)
    tx = SHARD_CLIPPERS[name](la, partition_specs=specs)
    f = jax.jit(jax.shard_map(tx.update, mesh=mesh, in_specs=(specs, P(), specs),
                              out_specs=(specs, P())))
    assert_runs_equal(run_steps(tx, axis, f), want)


@pytestmark_sharding
def test_layer_axis_split_across_two_mesh_axes():
    # eight layers, one per device, the layer axis split across ("data", "pipe") together
    mesh = mesh_2d()
    rng = np.random.default_rng(7)
    scales = np.geomspace(0.1, 10, 8)[:, None, None]

    def grads(t):
        return {"w": jnp.asarray(rng.normal(size=(8, 4, 4)) * scales * (1 + t), jnp.float32)}

    gs = [grads(t) for t in range(4)]
    specs = {"w": P(("data", "pipe"), None, None)}
    for make in (lambda **kw: optclip.adagc(warmup_steps=1, layer_axis=0, **kw),
                 lambda **kw: optclip.clip_by_leaf_norm(3.0, layer_axis=0, **kw)):
        ref = make()
        tx = make(partition_specs=specs)
        f = jax.jit(jax.shard_map(tx.update, mesh=mesh, in_specs=(specs, P()),
                                  out_specs=(specs, P())))
        s0, s1 = ref.init(gs[0]), tx.init(gs[0])
        ref_step = jax.jit(ref.update)
        for g in gs:
            u0, s0 = ref_step(g, s0)
            u1, s1 = f(g, s1)
            np.testing.assert_allclose(np.asarray(u1["w"]), np.asarray(u0["w"]), rtol=1e-5)
            for k, v in optclip.stats(s0).items():
                np.testing.assert_allclose(np.asarray(optclip.stats(s1)[k]), np.asarray(v),
                                           rtol=1e-5, err_msg=k)
        # leaf_norms inside shard_map: each device its own layers
        local = jax.jit(jax.shard_map(
            lambda g: optclip.leaf_norms(g, layer_axis=0, partition_specs=specs), mesh=mesh,
            in_specs=(specs,), out_specs={"w": P(("data", "pipe"))}))(gs[0])
        np.testing.assert_allclose(np.asarray(local["w"]),
                                   np.linalg.norm(np.asarray(gs[0]["w"]).reshape(8, -1), axis=1),
                                   rtol=1e-5)
