"""Every clipper sharded across 8 simulated CPU devices equals the unsharded one.

tests/conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optclip

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")

SHAPES = {"dense": (16, 8), "bias": (8,), "out": (8, 16), "conv": (3, 3, 8, 8)}


def grads_at(step):
    rng = np.random.default_rng(step)
    scale = [1.0, 1.3, 0.9, 20.0][step % 4]  # the last step is a spike
    return {k: jnp.asarray(rng.normal(size=s) * scale, jnp.float32) for k, s in SHAPES.items()}


PARAMS = {k: jnp.asarray(np.random.default_rng(99).normal(size=s) * 0.1, jnp.float32)
          for k, s in SHAPES.items()}

# Each entry builds the clipper given the sharding keyword arguments.
CLIPPERS = {
    "global_norm": lambda **kw: optclip.clip_by_global_norm(1.0, **kw),
    "global_norm_l1": lambda **kw: optclip.clip_by_global_norm(5.0, ord=1, **kw),
    "global_norm_linf": lambda **kw: optclip.clip_by_global_norm(0.5, ord=math.inf, **kw),
    "value": lambda **kw: optclip.clip_by_value(0.5, **kw),
    "leaf_norm": lambda **kw: optclip.clip_by_leaf_norm(1.0, **kw),
    "block_rms": lambda **kw: optclip.clip_by_block_rms(0.5, **kw),
    "agc": lambda **kw: optclip.agc(0.05, **kw),
    "autoclip": lambda **kw: optclip.autoclip(50.0, **kw),
    "zclip": lambda **kw: optclip.zclip(warmup_steps=2, **kw),
    "adagc": lambda **kw: optclip.adagc(warmup_steps=2, lambda_abs=5.0, **kw),
    "skip_nonfinite": lambda **kw: optclip.skip_nonfinite(optax.identity(), **kw),
    "skip_on_spike": lambda **kw: optclip.skip_on_spike(optax.identity(), warmup_steps=2,
                                                        z_thresh=1.0, **kw),
    "clippy": lambda **kw: optclip.clippy(0.5, 1e-3, **kw),
}
STEPS = 4


def run(tx, step_fn=None, grads=grads_at):
    """Updates and flat stats for STEPS steps; step_fn defaults to a plain jit."""
    step_fn = step_fn or jax.jit(tx.update)
    state = tx.init(PARAMS)
    outs = []
    for t in range(STEPS):
        u, state = step_fn(grads(t), state, PARAMS)
        outs.append((jax.device_get(u), jax.device_get(optclip.stats(state))))
    return outs


@functools.cache
def unsharded_step(name):
    """The unsharded clipper's jitted update, one per clipper: every unsharded reference
    of this file shares its compile."""
    tx = CLIPPERS[name]()
    return tx, jax.jit(tx.update)


@functools.cache
def reference(name):
    return run(*unsharded_step(name))


def assert_same_clean_and_nonfinite(name, tx, step):
    """``step`` (a sharded update of ``tx``) equals the unsharded clipper on the clean
    sequence, and on the sequence with a NaN and an inf on one shard, which it flags. One
    compiled step serves both sequences."""
    assert_same(run(tx, step), reference(name))
    got = run_bad(tx, step)
    assert_flagged(got)
    assert_same(got, bad_reference(name))


def assert_same(got, want):
    for (u1, s1), (u2, s2) in zip(got, want, strict=True):
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
        assert s1.keys() == s2.keys()
        for k in s1:
            np.testing.assert_allclose(np.asarray(s1[k]), np.asarray(s2[k]), rtol=1e-6, err_msg=k)


def test_reference_has_clips():
    # the sequence is such that the global clip engages: the comparisons below are not vacuous
    assert any(bool(s["clipped"]) for _, s in reference("global_norm"))
    assert any(bool(s["clipped"]) for _, s in reference("zclip"))
    assert any(bool(s["skipped"]) for _, s in reference("skip_on_spike"))


# --- jit with NamedSharding: no axis_name needed ------------------------------------------------

def fsdp_specs(mesh_axis="data"):
    return {"dense": P(mesh_axis), "bias": P(mesh_axis), "out": P(mesh_axis),
            "conv": P(None, None, mesh_axis)}


def tp_specs():
    return {"dense": P("data", "model"), "bias": P("model"), "out": P("model", "data"),
            "conv": P(None, None, "data", "model")}


def sharded_step(tx, mesh, specs):
    shard = {k: NamedSharding(mesh, s) for k, s in specs.items()}

    def step(g, s, p):
        g = jax.device_put(g, shard)
        p = jax.device_put(p, shard)
        return jax.jit(tx.update)(g, s, p)

    return step


@pytest.mark.parametrize("layout", ["fsdp", "tp"])
@pytest.mark.parametrize("name", sorted(CLIPPERS))
def test_jit_named_sharding_equals_unsharded(name, layout):
    devs = np.array(jax.devices()[:8])
    if layout == "fsdp":
        mesh, specs = Mesh(devs, ("data",)), fsdp_specs()
    else:
        mesh, specs = Mesh(devs.reshape(2, 4), ("data", "model")), tp_specs()
    tx = CLIPPERS[name]()
    assert_same_clean_and_nonfinite(name, tx, sharded_step(tx, mesh, specs))


# --- shard_map with axis_name / partition_specs ---------------------------------------------

def shard_map_step(tx, mesh, specs):
    def body(g, s, p):
        return tx.update(g, s, p)

    # out_specs P() for the state: shard_map checks that it is replicated on every device
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(specs, P(), specs),
                              out_specs=(specs, P())))
    return f


@pytest.mark.parametrize("name", sorted(CLIPPERS))
def test_shard_map_one_axis(name):
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    tx = CLIPPERS[name](axis_name="data")
    assert_same_clean_and_nonfinite(name, tx, shard_map_step(tx, mesh, fsdp_specs()))


@pytest.mark.parametrize("name", sorted(CLIPPERS))
def test_shard_map_tuple_of_axes(name):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    specs = fsdp_specs(("data", "model"))
    tx = CLIPPERS[name](axis_name=("data", "model"))
    assert_same_clean_and_nonfinite(name, tx, shard_map_step(tx, mesh, specs))


@pytest.mark.parametrize("name", sorted(CLIPPERS))
def test_shard_map_mixed_layout_partition_specs(name):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    specs = tp_specs()
    specs["bias"] = P()  # replicated: counted once, not eight times
    tx = CLIPPERS[name](partition_specs=specs)
    assert_same_clean_and_nonfinite(name, tx, shard_map_step(tx, mesh, specs))


def test_shard_map_without_axis_name_gives_local_norms():
    # the bug this guards against: inside shard_map a plain norm is per device
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    g = grads_at(0)
    local = jax.jit(jax.shard_map(lambda g: optclip.global_norm(g)[None], mesh=mesh,
                                  in_specs=(fsdp_specs(),), out_specs=P("data")))(g)
    combined = jax.jit(jax.shard_map(lambda g: optclip.global_norm(g, axis_name="data"),
                                     mesh=mesh, in_specs=(fsdp_specs(),), out_specs=P()))(g)
    assert len(set(np.asarray(local).round(5).tolist())) > 1
    np.testing.assert_allclose(float(combined), float(optclip.global_norm(g)), rtol=1e-6)


def test_pmap_axis_name():
    g = {"w": jnp.arange(16.0).reshape(8, 2)}
    out = jax.pmap(lambda g: optclip.global_norm(g, axis_name="i"), axis_name="i")(g)
    np.testing.assert_allclose(np.asarray(out), float(optclip.global_norm(g)), rtol=1e-6)


def test_bad_partition_specs():
    with pytest.raises(ValueError, match="structure of the updates"):
        optclip.global_norm({"a": jnp.ones(2), "b": jnp.ones(2)}, partition_specs={"a": P()})


# --- NaN and inf on one shard: every flag, every guard, every layout ----------------------------
# Step 1 has a NaN at [5, 0] of "dense", step 2 an inf at [12, 3]: each lives on one device only
# under every layout of this file (the jit and shard_map tests above run this sequence too,
# through assert_same_clean_and_nonfinite). A cross-device max may drop a NaN; the flags must not.

BAD = {1: ((5, 0), jnp.nan), 2: ((12, 3), jnp.inf)}


def bad_grads_at(step):
    g = grads_at(step)
    if step in BAD:
        where, value = BAD[step]
        g["dense"] = g["dense"].at[where].set(value)
    return g


def run_bad(tx, step_fn=None):
    return run(tx, step_fn, grads=bad_grads_at)


@functools.cache
def bad_reference(name):
    return run_bad(*unsharded_step(name))


def assert_flagged(outs):
    for step in BAD:
        u, s = outs[step]
        assert int(s["nonfinite_count"]) == step, (step, s)
        if "skipped" in s:
            assert bool(s["skipped"]) and bool(s["nonfinite"]), (step, s)
            np.testing.assert_array_equal(
                np.concatenate([np.ravel(x) for x in jax.tree.leaves(u)]), 0.0)
        else:
            assert bool(s["nonfinite"]) and not np.isfinite(s["grad_norm"]), (step, s)
    # and the statistics were not poisoned: the next step is finite again
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(outs[3][0]))
    assert not bool(outs[0][1]["nonfinite"]) and not bool(outs[3][1]["nonfinite"])


@pytest.mark.parametrize("name", sorted(CLIPPERS))
def test_nonfinite_unsharded_is_flagged(name):
    assert_flagged(bad_reference(name))


PMAP_SHAPES = {"dense": (16, 8), "bias": (8,), "out": (8, 16)}


@pytest.mark.parametrize("name", sorted(CLIPPERS))
def test_pmap_every_device_agrees_with_unsharded(name):
    # each of 8 devices holds 1/8 of every leaf (split along its first axis); steps 1 and 2
    # hold a NaN and an inf on one device
    def grads(t):
        return {k: v for k, v in bad_grads_at(t).items() if k in PMAP_SHAPES}

    params = {k: PARAMS[k] for k in PMAP_SHAPES}
    split = lambda tree: jax.tree.map(lambda x: x.reshape(8, -1, *x.shape[1:]), tree)  # noqa: E731
    unsplit = lambda tree: jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), tree)  # noqa: E731
    tx0, tx = CLIPPERS[name](), CLIPPERS[name](axis_name="i")
    s0 = tx0.init(params)
    s = jax.tree.map(lambda x: jnp.broadcast_to(x, (8, *jnp.shape(x))), tx.init(params))
    step = jax.pmap(tx.update, axis_name="i")
    step0 = jax.jit(tx0.update)
    for t in range(STEPS):
        u0, s0 = step0(grads(t), s0, params)
        u, s = step(split(grads(t)), s, split(params))
        for a, b in zip(jax.tree.leaves(unsplit(u)), jax.tree.leaves(u0), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
        want = optclip.stats(s0)
        got = jax.device_get(optclip.stats(s))
        for k, v in want.items():
            per_device = np.asarray(got[k])
            assert (per_device == per_device[0]).all() or np.isnan(per_device).all(), k
            np.testing.assert_allclose(per_device[0], np.asarray(v), rtol=1e-6, err_msg=k)
        if t in BAD:
            assert bool(want.get("skipped", want.get("nonfinite")))


@pytest.mark.parametrize("scale", [1.0, 1e30, 1e-30])
@pytest.mark.parametrize("p", [2, 3])
def test_gradient_of_global_norm_inside_shard_map(p, scale):
    # At 1e30 and 1e-30 the norm takes its rescue, whose scale came from a cross-device max:
    # JAX has no derivative of pmax, and the gradient raised. The scale is held constant now
    # (exact: c * ||x / c|| = ||x||).
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    f = jax.jit(jax.shard_map(lambda s: optclip.global_norm(s, ord=p, axis_name="data"),
                              mesh=mesh, in_specs=P("data"), out_specs=P()))
    x = jnp.arange(1.0, 17.0) * scale
    x64 = np.asarray(x, np.float64)
    want = x64 ** (p - 1) / np.linalg.norm(x64, p) ** (p - 1)
    np.testing.assert_allclose(np.asarray(jax.grad(f)(x)), want, rtol=1e-5)


def _one_clamp_grads(step):
    # small gradients: nothing clamped at 0.5, but on odd steps one element of "dense" on the
    # last shard (row 15 of 16), so that only one device sees a clamp
    g = {k: jnp.asarray(np.random.default_rng(step).normal(size=s) * 0.01, jnp.float32)
         for k, s in SHAPES.items()}
    if step % 2:
        g["dense"] = g["dense"].at[15, 3].set(-0.75)
    return g


@pytest.mark.parametrize("how", ["shard_map", "pmap", "named"])
def test_clip_by_value_clamp_on_one_shard_only_equals_unsharded(how):
    # the norm after the clamp is taken only on a step that clamped (a lax.cond on the global
    # flag): every device must take the same branch, and the stats must be the unsharded ones
    want = run(optclip.clip_by_value(0.5), grads=_one_clamp_grads)
    assert [bool(s["clipped"]) for _, s in want] == [False, True, False, True]
    devs = np.array(jax.devices()[:8])
    mesh = Mesh(devs, ("data",))
    if how == "shard_map":
        tx = optclip.clip_by_value(0.5, axis_name="data")
        got = run(tx, shard_map_step(tx, mesh, fsdp_specs()), grads=_one_clamp_grads)
    elif how == "named":
        tx = optclip.clip_by_value(0.5)
        got = run(tx, sharded_step(tx, mesh, fsdp_specs()), grads=_one_clamp_grads)
    else:
        tx = optclip.clip_by_value(0.5, axis_name="i")
        split = lambda g: {k: v.reshape(8, -1, *v.shape[1:]) if k != "conv"
                           else jnp.moveaxis(v.reshape(3, 3, 8, 1, 8), 2, 0) for k, v in g.items()}
        merge = lambda u: {k: v.reshape(SHAPES[k]) if k != "conv"
                           else jnp.moveaxis(v, 0, 2).reshape(SHAPES[k]) for k, v in u.items()}
        pstep = jax.pmap(tx.update, axis_name="i", in_axes=(0, None, 0), out_axes=(0, None))

        def step(g, s, p):
            u, s = pstep(split(g), s, split(p))
            return merge(u), s
        got = run(tx, step, grads=_one_clamp_grads)
    assert_same(got, want)


@pytest.mark.parametrize("how", ["shard_map", "pmap", "other_axis", "local"])
@pytest.mark.parametrize("with_min", [False, True])
def test_clip_by_value_with_a_bound_that_differs_across_devices(with_min, how):
    # A bound may be computed on each device (here from its index). Each device clamps its
    # shard to its own bound, and grad_norm, scale and clipped are those of all the shards
    # combined across the axes given. Before, without min_value, the norm after the clamp
    # was scaled by each device's own bound: inside shard_map that failed to trace, under
    # pmap each device's scale was wrong. "other_axis": the bound varies along a mesh axis
    # the leaves are not split over (each group of devices with one bound has its own
    # stats); "local": no axis_name, each device's stats its own (a collective across
    # devices in that branch of the norm-after cond deadlocked here).
    x = {"w": np.arange(64.0).reshape(8, 8) / 10 - 3, "b": np.linspace(-2.0, 2.0, 16).reshape(8, 2)}
    g = {k: jnp.asarray(v, jnp.float32) for k, v in x.items()}
    # clamps on every device; clamps nothing; clamps on the first device (or group) only, so
    # that devices take different branches of the norm-after cond where no axis joins them
    for base, step in ((0.5, 0.1), (100.0, 0.1), (0.5, 100.0)):
        def body(g, base=base, step=step):
            axis = "i" if how == "pmap" else "model" if how == "other_axis" else "data"
            hi = base + step * lax.axis_index(axis).astype(jnp.float32)
            kw = {} if how == "local" else {"axis_name": "i" if how == "pmap" else "data"}
            bound = (lambda count: hi) if how == "pmap" else hi  # a schedule, an array
            tx = (optclip.clip_by_value(bound, -0.5 * hi, **kw) if with_min
                  else optclip.clip_by_value(bound, **kw))
            u, state = tx.update(g, tx.init(g))
            st = optclip.stats(state)
            st = jnp.stack([st["grad_norm"], st["scale"], st["clipped"].astype(jnp.float32)])
            return u, st[None, None] if how == "other_axis" else st[None]

        if how == "pmap":
            u, st = jax.pmap(body, axis_name="i")(g)
            st = st[:, 0]
        elif how == "other_axis":  # rows split 4 ways over "data", the bound by "model"
            mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
            u, st = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("data"),),
                                          out_specs=(P("data", "model"), P("data", "model"))))(g)
        else:
            mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
            u, st = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("data"),),
                                          out_specs=(P("data"), P("data"))))(g)
            st = np.asarray(st)
        # bounds per device (one row of each leaf each), or per "model" group
        his = base + step * np.arange(2 if how == "other_axis" else 8)
        los = -0.5 * his if with_min else -his
        if how == "other_axis":
            groups = [({k: np.clip(v, los[m], his[m]) for k, v in x.items()}, x, st[:, m])
                      for m in range(2)]
            for m, (want, _, _) in enumerate(groups):
                for k, v in u.items():
                    w = np.asarray(v).reshape(8, 2, -1)[:, m]  # the model copies side by side
                    np.testing.assert_allclose(w, want[k], rtol=1e-6)
        else:
            want = {k: np.clip(v, los[:, None], his[:, None]) for k, v in x.items()}
            for k in g:
                np.testing.assert_allclose(np.asarray(u[k]), want[k], rtol=1e-6)
            if how == "local":
                groups = [({k: v[r] for k, v in want.items()}, {k: v[r] for k, v in x.items()},
                           st[r]) for r in range(8)]
            else:
                groups = [(want, x, row) for row in st]
        for want_g, x_g, got in groups:
            before = math.sqrt(sum((v ** 2).sum() for v in x_g.values()))
            after = math.sqrt(sum((v ** 2).sum() for v in want_g.values()))
            clipped = any((v != want_g[k]).any() for k, v in x_g.items())
            got = np.asarray(got).reshape(-1, 3)
            np.testing.assert_allclose(got, np.tile([before, after / before, clipped],
                                                    (len(got), 1)), rtol=1e-5)
        assert bool(np.asarray(st)[..., 2].any()) is (base == 0.5)  # the comparisons bite


# --- many small leaves: the per-leaf results are handed out by selection (XLA:CPU) -----------

MANY = {**{f"w{i:02d}": (16, 8) for i in range(10)}, **{f"b{i:02d}": (8,) for i in range(10)}}


def _many_grads(step):
    rng = np.random.default_rng(100 + step)
    g = {k: jnp.asarray(rng.normal(size=s) * (1.0 + 3 * (i % 3)), jnp.float32)
         for i, (k, s) in enumerate(MANY.items())}
    if step == 1:  # a NaN in one leaf stays in that leaf
        g["w03"] = g["w03"].at[9, 2].set(jnp.nan)
        g["b05"] = g["b05"].at[4].set(jnp.inf)
    else:  # all-zero leaves (frozen): the rescue's max shows them to be 0
        g["w06"] = jnp.zeros_like(g["w06"])
        g["b02"] = jnp.zeros_like(g["b02"])
    if step == 2:  # and a leaf of tiny values, whose sum of squares underflows
        g["b07"] = jnp.full_like(g["b07"], 1e-30)
    return g


MANY_PARAMS = {k: jnp.asarray(np.random.default_rng(7).normal(size=s) * 0.1, jnp.float32)
               for k, s in MANY.items()}


def _many_go(tx, step_fn):
    state = tx.init(MANY_PARAMS)
    outs = []
    for t in range(3):
        u, state = step_fn(_many_grads(t), state, MANY_PARAMS)
        outs.append((jax.device_get(u), jax.device_get(optclip.stats(state))))
    return outs


@functools.cache
def _many_reference(name):
    return _many_go(*unsharded_step(name))


@pytest.mark.parametrize("how", ["shard_map", "pmap", "named"])
@pytest.mark.parametrize("name", ["leaf_norm", "block_rms", "agc", "adagc", "clippy"])
def test_many_small_leaves_sharded_equal_unsharded(name, how):
    # 20 small leaves in two groups of 10 of one shape, stacked and reduced together: each
    # leaf's norm and scale reach it from its group's results (norms.split_flat: a gather on
    # XLA:CPU), not by a slice
    want = _many_reference(name)
    u_bad = want[1][0]
    assert np.isnan(u_bad["w03"]).any() or np.isinf(u_bad["w03"]).any()
    finite = [k for k in MANY if k not in ("w03", "b05")]
    assert all(np.isfinite(u_bad[k]).all() for k in finite)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    specs = {k: P("data") for k in MANY}
    if how == "shard_map":
        tx = CLIPPERS[name](axis_name="data")
        got = _many_go(tx, shard_map_step(tx, mesh, specs))
    elif how == "named":
        tx = CLIPPERS[name]()
        shard = {k: NamedSharding(mesh, s) for k, s in specs.items()}
        got = _many_go(tx, lambda g, s, p: jax.jit(tx.update)(jax.device_put(g, shard), s,
                                                        jax.device_put(p, shard)))
    else:
        tx = CLIPPERS[name](axis_name="i")
        split = lambda g: {k: v.reshape(8, -1, *v.shape[1:]) for k, v in g.items()}
        merge = lambda u: {k: v.reshape(MANY[k]) for k, v in u.items()}
        pstep = jax.pmap(tx.update, axis_name="i", in_axes=(0, None, 0), out_axes=(0, None))
        got = _many_go(tx, lambda g, s, p: (lambda u, s: (merge(u), s))(
            *pstep(split(g), s, split(p))))
    for (u1, s1), (u2, s2) in zip(got, want, strict=True):
        for k in MANY:
            np.testing.assert_allclose(np.asarray(u1[k]), np.asarray(u2[k]), rtol=1e-6,
                                       atol=1e-7, err_msg=k)
        for k in s1:
            np.testing.assert_allclose(np.asarray(s1[k]), np.asarray(s2[k]), rtol=1e-6,
                                       err_msg=k)


@pytest.mark.parametrize("scale", [1e-25, 1.0, 1e25])
def test_gradient_through_a_sharded_norm(scale):
    # As a psum of the shards' sums, and as norm_across, the L2 norm of the shards' own norms
    # (agc's stats across mesh axes), whose pmax had no derivative: jax.grad raised
    # "Differentiation rule for 'pmax' not implemented". At 1e-25 and 1e25 through the rescue.
    mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
    a = np.linspace(1, 2, 64) * scale
    want = a / np.linalg.norm(a)
    x = jax.device_put(jnp.asarray(a, jnp.float32), NamedSharding(mesh, P("d")))
    t = jnp.asarray(np.linspace(-1, 3, 64), jnp.float32)
    for norm in (lambda v: optclip.global_norm(v, axis_name="d"),
                 lambda v: optclip.norms.norm_across(optclip.global_norm(v), ("d",))):
        f = jax.jit(jax.shard_map(norm, mesh=mesh, in_specs=P("d"), out_specs=P()))
        np.testing.assert_allclose(np.asarray(jax.grad(f)(x)), want, rtol=2e-5)
        np.testing.assert_allclose(float(jax.jvp(f, (x,), (t,))[1]), np.dot(want, t),
                                   rtol=2e-5)


@pytest.mark.parametrize("name", ["agc", "global_norm_linf", "global_norm"])
def test_gradient_through_shard_map_equals_unsharded(name):
    # jax.grad through agc and the L-inf clipper inside shard_map raised: "Differentiation
    # rule for 'pmax' not implemented" (agc's stats combine per-group norms by a pmax; the
    # L-inf norm is one).
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    specs = tp_specs()
    tx_ref, tx = CLIPPERS[name](), CLIPPERS[name](partition_specs=specs)
    body = jax.shard_map(lambda g, s, p: tx.update(g, s, p)[0], mesh=mesh,
                         in_specs=(specs, P(), specs), out_specs=specs)

    def loss(update, g, state):
        return sum(jnp.sum(jnp.sin(v)) for v in jax.tree.leaves(update(g, state, PARAMS)))

    g = grads_at(3)  # the spike: every clipper clips
    want = jax.grad(loss, argnums=1)(lambda *a: tx_ref.update(*a)[0], g, tx_ref.init(PARAMS))
    got = jax.jit(jax.grad(lambda g, s: loss(body, g, s)))(g, tx.init(PARAMS))
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=2e-5,
                                   atol=1e-7, err_msg=k)


def test_gradient_through_skip_on_spike_watching_the_loss_in_shard_map():
    # The loss, combined across the mesh axes by a pmax, may carry a tangent (a meta-gradient
    # through a step whose loss depends on the parameters): jax.grad raised "Differentiation
    # rule for 'pmax' not implemented" (found in review, helper-42).
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    specs = tp_specs()

    def make(**kw):
        return optclip.skip_on_spike(optax.sgd(1.0), on="loss", warmup_steps=2, **kw)

    ref, tx = make(), make(partition_specs=specs)
    body = jax.shard_map(lambda g, s, p, v: tx.update(g, s, p, value=v)[0], mesh=mesh,
                         in_specs=(specs, P(), specs, P()), out_specs=specs)

    def loss(u):
        return sum(jnp.sum(jnp.sin(v)) for v in jax.tree.leaves(u))

    g, v = grads_at(1), jnp.asarray(1.5)
    want = jax.grad(lambda g, v: loss(ref.update(g, ref.init(PARAMS), PARAMS, value=v)[0]),
                    argnums=(0, 1))(g, v)
    got = jax.jit(jax.grad(lambda g, v: loss(body(g, tx.init(PARAMS), PARAMS, v)),
                           argnums=(0, 1)))(g, v)
    for k in want[0]:
        np.testing.assert_allclose(np.asarray(got[0][k]), np.asarray(want[0][k]), rtol=2e-5,
                                   atol=1e-7, err_msg=k)
    np.testing.assert_allclose(float(got[1]), float(want[1]), atol=1e-7)
