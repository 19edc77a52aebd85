"""Guards: a skipped step leaves everything as it was, and is counted.

skip_on_spike's rolling-window rule is checked step for step against a NumPy
reference written from the rule of OLMo-core / MaxText / Levanter, with
optclip's documented differences (the window holds taken steps only, it must
be full, one-sided test, eps added to the sample standard deviation).
"""

import collections
import math

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

import optclip
from bench.eager_probe import lowerings

P = {"w": jnp.array([1.0, 2.0]), "i": jnp.arange(2)}


def leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- skip_nonfinite -------------------------------------------------------------------------

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
    # bit for bit against the inner optimizer's compiled step: the guard takes the step inside
    # a lax.cond, which XLA compiles even when called eagerly, and Adam's eager op-by-op
    # result differs from its compiled one by an ulp (as jit(adam.update) does)
    inner = optax.adam(1e-2)
    tx = optclip.skip_nonfinite(inner)
    s1, s2, s3 = tx.init(P), inner.init(P), tx.init(P)
    for k in range(3):
        g = {"w": jnp.array([k + 1.0, -2.0]), "i": jnp.zeros(2, jnp.int32)}
        u1, s1 = tx.update(g, s1, P)
        u2, s2 = jax.jit(inner.update)(g, s2, P)
        u3, s3 = jax.jit(tx.update)(g, s3, P)
        leaves_equal(u1, u2)
        leaves_equal(u3, u2)
    leaves_equal(s1.inner_state, s2)
    leaves_equal(s3.inner_state, s2)


@pytest.mark.parametrize("guard", [optclip.skip_nonfinite,
                                   lambda i: optclip.skip_on_spike(i, warmup_steps=1)])
def test_extra_args_that_are_not_arrays_reach_the_inner_optimizer(guard):
    # the step runs inside a lax.cond; extra args that are not JAX arrays (a string, a
    # Python bool or int, a NumPy table) reach the inner optimizer as they were given, not
    # as traced operands (a Python `if` on a bool, a shape from an int)
    def update(u, s, p=None, *, scale="half", halve=False, n_micro=1, table=None, **_):
        k = {"half": 0.5, "one": 1.0}[scale] * (0.5 if halve else 1.0) / n_micro
        k *= 1.0 if table is None else float(np.sum(table))
        return jax.tree.map(lambda x: x * k + jnp.zeros((n_micro,)).sum(), u), s

    tx = guard(optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update))
    g = jnp.array([2.0, 4.0])
    s = tx.init(g)
    for scale, want in (("half", [1.0, 2.0]), ("one", [2.0, 4.0])):
        u, _ = jax.jit(lambda g, s, scale=scale: tx.update(g, s, None, scale=scale,
                                                           value=jnp.asarray(1.0)))(g, s)
        np.testing.assert_array_equal(np.asarray(u), want)
        u, s2 = tx.update(g.at[0].set(jnp.nan), s, None, scale=scale, value=1.0)
        assert bool(s2.stats.skipped)
        np.testing.assert_array_equal(np.asarray(u), 0.0)
    kw = {"halve": True, "n_micro": 2, "table": np.array([1.0, 1.0])}
    u, _ = tx.update(g, s, None, scale="one", value=1.0, **kw)
    np.testing.assert_array_equal(np.asarray(u), [1.0, 2.0])  # 2 * 0.5 / 2 * 2
    # with no string among them, called again and again: an eager update runs compiled from
    # its second call when every argument is a JAX array; the bool, the int and the table
    # are not, and must reach the inner optimizer as they are, never as traced operands
    for _ in range(3):
        u, _ = tx.update(g, s, None, value=jnp.asarray(1.0), **kw)
        np.testing.assert_array_equal(np.asarray(u), [0.5, 1.0])  # 2 * 0.5 * 0.5 / 2 * 2
    # JAX-array extra args alone: the compiled path from the second such call, with the inner
    # optimizer's defaults
    for _ in range(3):
        u, _ = tx.update(g, s, None, value=jnp.asarray(1.0))
        np.testing.assert_array_equal(np.asarray(u), [1.0, 2.0])
    assert lowerings(lambda: tx.update(g, s, None, value=jnp.asarray(1.0)))[1] == []


def test_state_built_for_other_params_is_refused_by_name():
    tx = optclip.skip_nonfinite(optax.adam(1e-2))
    with pytest.raises(ValueError, match=r"mu.*has shape \(1,\).*returns shape \(2,\)"):
        tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(1)}), {"w": jnp.ones(2)})


def test_weak_typed_state_stays_weak_and_compiles_once():
    inner = optax.GradientTransformation(lambda p: {"n": jnp.asarray(0.0)},  # weak-typed
                                         lambda u, s, p=None: (u, {"n": s["n"] + 1.0}))
    tx = optclip.skip_nonfinite(inner)
    f = jax.jit(tx.update)
    s = tx.init({"w": jnp.ones(2)})
    for g in (1.0, jnp.nan, 1.0):
        _, s = f({"w": jnp.full(2, g)}, s, None)
    assert jax.typeof(s.inner_state["n"]).weak_type and float(s.inner_state["n"]) == 2.0
    assert f._cache_size() == 1


def test_state_whose_dtype_the_inner_narrows_is_kept_bit_for_bit_on_a_skip():
    # a select kept such a leaf in the promoted dtype; so does the cond
    def update(u, s, p=None, **_):
        return u, s.astype(jnp.int32)

    tx = optclip.skip_nonfinite(optax.GradientTransformationExtraArgs(
        lambda p: jnp.array([1.7, -2.5]), update))
    _, s = tx.update(jnp.array([jnp.nan]), tx.init(None), None)
    assert bool(s.stats.skipped)
    np.testing.assert_array_equal(np.asarray(s.inner_state), np.float32([1.7, -2.5]))


def test_large_finite_fp16_is_not_skipped():
    tx = optclip.skip_nonfinite(optax.sgd(1.0))
    g = jnp.full((1000,), 300.0, jnp.float16)  # its fp16 sum of squares would overflow
    u, state = tx.update(g, tx.init(g), g)
    assert not bool(state.stats.skipped)
    np.testing.assert_allclose(float(state.stats.grad_norm), 9486.833, rtol=1e-6)


def test_skip_nonfinite_passes_extra_args_to_a_plain_inner():
    # clip_by_global_norm is a plain GradientTransformation: the guard must not hand it value=
    tx = optclip.skip_nonfinite(optax.chain(optclip.clip_by_global_norm(1.0)))
    tx2 = optclip.skip_nonfinite(optclip.clip_by_global_norm(1.0))
    g = jnp.array([3.0, 4.0])
    for t in (tx, tx2):
        u, _ = t.update(g, t.init(g), g, value=jnp.asarray(1.0))
        np.testing.assert_allclose(np.asarray(u), [0.6, 0.8], rtol=1e-6)


# --- skip_on_spike: the NumPy reference of the rule -----------------------------------------

def spike_ref(grad_norms, losses, *, on, window=None, z_thresh=3.0, max_consecutive=None,
              alpha=0.97, warmup_steps=25, eps=1e-6):
    """Per step: skipped, spike per signal, forced, and the (mean, std) compared against.

    Window rule: a value v is a spike when the window of the last `window` *taken* values of
    its signal is full and (v - mean) / (std + eps) > z_thresh, std the sample std (ddof=1).
    EMA rule: zclip's statistics (Welford during warm-up, then the EMA), which record the
    threshold instead of a skipped spike. Non-finite gradients (and a non-finite watched
    loss) are always skipped and recorded nowhere. After max_consecutive skips in a row the
    next finite spike is taken and recorded as it is.
    """
    sigs = {"grad_norm": ["g"], "loss": ["l"], "both": ["g", "l"]}[on]
    bufs = {s: collections.deque(maxlen=window) for s in sigs}
    ema = {s: {"buf": [], "mean": None, "var": None} for s in sigs}
    consecutive = 0
    out = []
    margins = []
    for g, loss in zip(grad_norms, losses, strict=True):
        v = {"g": float(g), "l": float(loss)}
        bad = not math.isfinite(v["g"]) or ("l" in sigs and not math.isfinite(v["l"]))
        rec = {"spike": {}, "mean": {}, "std": {}}
        bound = {}
        for s in sigs:
            if window is not None:
                buf = np.array(bufs[s], np.float64)
                ready = len(buf) == window
                mean = buf.mean() if len(buf) else 0.0
                std = buf.std(ddof=1) if len(buf) >= 2 else 0.0
            else:
                e = ema[s]
                ready = e["mean"] is not None
                buf = np.array(e["buf"], np.float64)
                mean = e["mean"] if ready else (buf.mean() if len(buf) else 0.0)
                std = math.sqrt(e["var"]) if ready else (buf.std() if len(buf) else 0.0)
            z = (v[s] - mean) / (std + eps)
            spike = ready and math.isfinite(v[s]) and z > z_thresh
            if ready and math.isfinite(v[s]):
                margins.append(abs(z - z_thresh) / z_thresh)
            rec["spike"][s], rec["mean"][s], rec["std"][s] = spike, mean, std
            bound[s] = mean + z_thresh * (std + eps)
        spike = any(rec["spike"].values())
        forced = (spike and not bad and max_consecutive is not None
                  and consecutive >= max_consecutive)
        skip = bad or (spike and not forced)
        consecutive = consecutive + 1 if skip else 0
        for s in sigs:
            if window is not None:
                if not skip:
                    bufs[s].append(v[s])
            elif not bad:
                e = ema[s]
                x = bound[s] if (rec["spike"][s] and not forced) else v[s]
                if e["mean"] is None:
                    e["buf"].append(x)
                    if len(e["buf"]) >= warmup_steps:
                        e["mean"], e["var"] = np.mean(e["buf"]), np.var(e["buf"])
                else:
                    e["mean"] = alpha * e["mean"] + (1 - alpha) * x
                    e["var"] = alpha * e["var"] + (1 - alpha) * (x - e["mean"]) ** 2
        rec["skipped"], rec["forced"] = skip, forced
        out.append(rec)
    return out, min(margins)


def recorded_sequences(n=90, seed=3):
    """Grad norms and losses with lone spikes, a spike pair, non-finite steps, and a
    lasting change of scale of each near the end."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    g = 1.0 + 0.1 * np.sin(t / 3.0) + 0.05 * rng.normal(size=n)
    g[[14, 33, 34, 52]] *= [8.0, 30.0, 5.0, 12.0]
    g[30] = np.nan
    g[70:] *= 4.0
    loss = 3.0 - 0.01 * t + 0.02 * rng.normal(size=n)
    loss[[20, 45, 46]] += [1.5, 3.0, 1.0]
    loss[40] = np.nan
    loss[80:] += 2.0
    return g.astype(np.float32), loss.astype(np.float32)


DIRECTION = {"a": np.array([0.6, 0.0], np.float32), "b": np.array([[0.8]], np.float32)}
P0 = {k: jnp.ones_like(jnp.asarray(v)) for k, v in DIRECTION.items()}


def run_scan(tx, norms, losses, inner_params=P0):
    """Feeds gradients of the given global norms and the losses through tx in one scan."""
    grads = {k: jnp.asarray(norms).reshape((-1,) + (1,) * v.ndim) * v
             for k, v in DIRECTION.items()}

    @jax.jit
    def go(grads, losses):
        def body(s, gl):
            g, loss = gl
            u, s = tx.update(g, s, inner_params, value=loss)
            return s, (optclip.global_norm(u), s.stats)
        return lax.scan(body, tx.init(inner_params), (grads, jnp.asarray(losses)))

    state, (out_norms, stats) = go(grads, losses)
    return state, np.asarray(out_norms), jax.tree.map(np.asarray, stats)


REF_CONFIGS = [
    {"on": "grad_norm", "window": 8},
    {"on": "loss", "window": 8},
    {"on": "both", "window": 8},
    {"on": "grad_norm", "window": 8, "max_consecutive": 3},
    {"on": "loss", "window": 8, "max_consecutive": 2},
    {"on": "both", "window": 8, "max_consecutive": 3},
    {"on": "both", "window": None, "warmup_steps": 10},
    {"on": "loss", "window": None, "warmup_steps": 10, "max_consecutive": 2},
]


@pytest.mark.parametrize("cfg", REF_CONFIGS, ids=str)
def test_skip_on_spike_matches_numpy_reference(cfg):
    g, loss = recorded_sequences()
    want, margin = spike_ref(g.astype(np.float64), loss.astype(np.float64), **cfg)
    assert margin > 1e-3  # no decision is a rounding away from flipping
    tx = optclip.skip_on_spike(optax.adam(1e-2), z_thresh=3.0, **cfg)
    state, out, st = run_scan(tx, g, loss)
    skipped = np.array([r["skipped"] for r in want])
    forced = np.array([r["forced"] for r in want])
    np.testing.assert_array_equal(st.skipped, skipped)
    np.testing.assert_array_equal(st.forced, forced)
    for sig, key in (("g", "grad_norm"), ("l", "loss")):
        if sig not in want[0]["spike"]:
            assert not st.__getattribute__(f"spike_{key}").any()
            continue
        np.testing.assert_array_equal(getattr(st, f"spike_{key}"),
                                      [r["spike"][sig] for r in want])
        np.testing.assert_allclose(getattr(st, f"{key}_mean"), [r["mean"][sig] for r in want],
                                   rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(getattr(st, f"{key}_std"), [r["std"][sig] for r in want],
                                   rtol=2e-4, atol=1e-5)
    assert int(state.stats.skip_count) == skipped.sum()
    assert int(state.stats.forced_count) == forced.sum()
    assert np.all(out[skipped] == 0) and np.all(out[~skipped] > 0)
    # adam's count advanced only on the steps that were taken
    assert int(state.inner_state[0].count) == len(g) - skipped.sum()
    # not vacuous: spikes are skipped, and with max_consecutive steps are forced
    assert skipped.sum() >= 4
    assert (forced.sum() > 0) == (cfg.get("max_consecutive") is not None)


def test_window_locks_out_a_lasting_shift_unless_max_consecutive():
    g, loss = recorded_sequences()
    for mc, locked in ((None, True), (3, False)):
        tx = optclip.skip_on_spike(optax.sgd(1.0), z_thresh=3.0, window=8, max_consecutive=mc)
        _, _, st = run_scan(tx, g, loss)
        tail = st.skipped[70:]  # the grad norm is 4x larger from step 70 on
        assert tail.all() == locked
        if not locked:
            assert not tail[-5:].any()  # the window has moved to the new scale
            assert st.forced_count[-1] >= 1


# --- skip_on_spike: state, extra args, checkpoints ------------------------------------------

def test_skipped_step_leaves_inner_state_bit_identical():
    inner = optax.chain(optclip.clip_by_global_norm(1.0), optax.adam(1e-2))
    tx = optclip.skip_on_spike(inner, window=4, on="both", z_thresh=3.0)
    step = jax.jit(tx.update)
    state = tx.init(P)
    zi = jnp.zeros(2, jnp.int32)
    for k in range(6):
        _, state = step({"w": jnp.array([1.0 + 0.01 * k, 0.5]), "i": zi}, state, P,
                        value=jnp.asarray(2.0 - 0.01 * k))
    assert not bool(state.stats.skipped)
    for g, loss in (([1.0, 0.5], 50.0), ([40.0, 0.5], 2.0), ([jnp.nan, 0.5], 2.0)):
        before = state
        u, state = step({"w": jnp.array(g), "i": zi}, state, P, value=jnp.asarray(loss))
        assert bool(state.stats.skipped)
        np.testing.assert_array_equal(np.asarray(u["w"]), 0.0)
        leaves_equal(state.inner_state, before.inner_state)
        leaves_equal(state.history, before.history)  # nothing entered the window


def test_value_reaches_the_inner_optimizer_and_works_inside_chain():
    plateau = optax.contrib.reduce_on_plateau(factor=0.5, patience=1, cooldown=0)
    tx = optclip.skip_on_spike(optax.chain(optax.sgd(1.0), plateau), window=4, on="loss")
    x = jnp.ones(2)
    state = tx.init(x)
    for _ in range(6):  # a loss that never improves: the plateau halves the scale
        _, state = tx.update(jnp.ones(2), state, x, value=jnp.asarray(1.0))
    assert float(state.inner_state[1].scale) < 1.0
    chained = optax.chain(optclip.skip_on_spike(optax.sgd(1.0), window=2, on="loss"),
                          optax.scale(2.0))
    s = chained.init(x)
    for loss in (1.0, 1.01, 0.99, 50.0):
        u, s = chained.update(jnp.ones(2), s, x, value=loss)
    np.testing.assert_array_equal(np.asarray(u), 0.0)
    assert int(optclip.stats(s)["skip_count"]) == 1


def test_loss_needed_and_must_be_a_scalar():
    x = jnp.ones(2)
    for on in ("loss", "both"):
        tx = optclip.skip_on_spike(optax.sgd(1.0), on=on, window=4)
        with pytest.raises(ValueError, match="value=loss"):
            tx.update(x, tx.init(x), x)
        with pytest.raises(ValueError, match="scalar"):
            tx.update(x, tx.init(x), x, value=jnp.ones(3))


def test_nonfinite_loss_or_grads_skip_and_never_enter_the_window():
    tx = optclip.skip_on_spike(optax.sgd(1.0), window=3, on="loss")
    x = jnp.ones(2)
    step = jax.jit(tx.update)
    state = tx.init(x)
    for g, loss in ((x, jnp.nan), (x * jnp.inf, 1.0), (x, jnp.inf)):
        before = state.history
        u, state = step(g, state, x, value=jnp.asarray(loss))
        assert bool(state.stats.skipped) and bool(state.stats.nonfinite)
        leaves_equal(state.history, before)
    assert int(state.stats.nonfinite_count) == 3 and int(state.history.count) == 0


def run_steps(step, x, s, n, k0=0):
    for k in range(k0, k0 + n):
        g = jnp.array([1.0 + 0.05 * math.sin(k), 0.5]) * (30.0 if k in (9, 10, 13) else 1.0)
        loss = 2.0 - 0.01 * k + (5.0 if k in (9, 11) else 0.0)
        u, s = step(jnp.asarray(g), s, x, value=jnp.asarray(loss))
        x = optax.apply_updates(x, u)
    return x, s


@pytest.mark.parametrize("cfg", [{"window": None, "warmup_steps": 3},
                                 {"window": 5, "on": "both", "max_consecutive": 1},
                                 {"window": 4, "on": "loss"}], ids=str)
def test_checkpoint_round_trip_mid_run_is_bit_identical(cfg):
    tx = optclip.skip_on_spike(optax.adam(1e-2), z_thresh=3.0, **cfg)
    step = jax.jit(tx.update)
    x0 = jnp.zeros(2)
    x, s = run_steps(step, x0, tx.init(x0), 10)  # mid-run, right after a skip
    assert int(s.stats.skip_count) >= 1 and int(s.consecutive) >= 1
    blob = flax.serialization.to_bytes((x, s))
    x2, s2 = flax.serialization.from_bytes((x0, tx.init(x0)), blob)
    a = run_steps(step, x, s, 8, k0=10)
    b = run_steps(step, x2, s2, 8, k0=10)
    leaves_equal(a, b)
    assert int(a[1].stats.skip_count) > int(s.stats.skip_count)
    # a restored state holds NumPy arrays; an eager step takes it as it is (equal to the
    # jitted step up to an ulp: eager and compiled arithmetic differ)
    _, s3 = tx.update(jnp.ones(2), s2, x2, value=jnp.asarray(2.0))
    _, s4 = step(jnp.ones(2), s2, x2, value=jnp.asarray(2.0))
    for p, q in zip(jax.tree.leaves(s3), jax.tree.leaves(s4), strict=True):
        np.testing.assert_allclose(np.asarray(p), np.asarray(q), rtol=1e-6)


# --- Task B: every device skips together -----------------------------------------------------

needs8 = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")

GUARDS = {
    "skip_nonfinite": lambda **kw: optclip.skip_nonfinite(optax.sgd(1.0), **kw),
    "spike_ema": lambda **kw: optclip.skip_on_spike(optax.sgd(1.0), warmup_steps=2, **kw),
    "spike_window": lambda **kw: optclip.skip_on_spike(optax.sgd(1.0), window=2, **kw),
    "spike_window_both": lambda **kw: optclip.skip_on_spike(optax.sgd(1.0), window=2,
                                                            on="both", **kw),
}


def mesh1():
    return Mesh(np.array(jax.devices()[:8]), ("data",))


def mesh2():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


def shard_map_skipped(tx, mesh, specs, g, poison=None):
    """Per device, whether it skipped; ``poison(g)`` may make some leaves device-varying."""
    axes = tuple(mesh.axis_names)

    def body(g, s):
        if poison is not None:
            g = poison(g)
        _, s = tx.update(g, s, None, value=jnp.asarray(1.0))
        return s.stats.skipped.reshape((1,) * len(axes))

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(specs, PS()), out_specs=PS(*axes)))
    return np.asarray(f(g, tx.init(g))).ravel()


@needs8
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
@pytest.mark.parametrize("name", sorted(GUARDS))
def test_nan_on_one_shard_shard_map_axis_name(name, bad):
    specs = {"w": PS("data"), "b": PS("data")}
    for where in range(0, 16, 5):  # a different shard each time
        g = {"w": jnp.ones((16, 4)).at[where, 1].set(bad), "b": jnp.zeros(8)}
        assert shard_map_skipped(GUARDS[name](axis_name="data"), mesh1(), specs, g).all()
    g = {"w": jnp.ones((16, 4)), "b": jnp.zeros(8)}
    assert not shard_map_skipped(GUARDS[name](axis_name="data"), mesh1(), specs, g).any()


@needs8
@pytest.mark.parametrize("name", sorted(GUARDS))
def test_nan_on_one_shard_shard_map_mixed_partition_specs(name):
    specs = {"w": PS("data", "model"), "o": PS("model"), "b": PS()}
    base = {"w": jnp.ones((4, 8)), "o": jnp.ones((8,)), "b": jnp.ones(3)}
    tx = GUARDS[name](partition_specs=specs)
    for leaf, idx in (("w", (3, 6)), ("o", (1,))):
        g = dict(base, **{leaf: base[leaf].at[idx].set(jnp.nan)})
        assert shard_map_skipped(tx, mesh2(), specs, g).all()

    # a "replicated" leaf that is not (per-device gradients not yet summed): NaN on one device
    def poison(g):
        me = lax.axis_index(("data", "model"))
        return dict(g, b=jnp.where(me == 5, jnp.nan, g["b"]))

    assert shard_map_skipped(tx, mesh2(), specs, base, poison).all()
    assert not shard_map_skipped(tx, mesh2(), specs, base).any()


@needs8
@pytest.mark.parametrize("name", sorted(GUARDS))
def test_nan_on_one_device_pmap(name):
    tx = GUARDS[name](axis_name="i")
    g = jnp.ones((8, 2, 3))
    state = jax.tree.map(lambda x: jnp.stack([x] * 8), tx.init(g[0]))
    f = jax.pmap(lambda g, s, b: tx.update(g * b, s, None, value=jnp.asarray(1.0))[1].stats,
                 axis_name="i")
    for dev in (0, 5):
        for bad in (jnp.nan, jnp.inf):
            poison = jnp.ones(8).at[dev].set(bad)[:, None, None]
            assert np.asarray(f(g, state, poison).skipped).all()
    assert not np.asarray(f(g, state, jnp.ones((8, 1, 1))).skipped).any()


@needs8
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
@pytest.mark.parametrize("name", sorted(GUARDS))
def test_nan_under_jit_with_named_sharding(name, bad):
    tx = GUARDS[name]()
    g = jnp.ones((16, 4)).at[5, 0].set(bad)
    gs = jax.device_put(g, NamedSharding(mesh1(), PS("data")))
    u, s = jax.jit(lambda g, s: tx.update(g, s, g, value=jnp.asarray(1.0)))(gs, tx.init(g))
    assert bool(s.stats.skipped)
    np.testing.assert_array_equal(np.asarray(u), 0.0)


@needs8
@pytest.mark.parametrize("name", sorted(GUARDS))
def test_guarded_adam_with_sharded_state_inside_shard_map_equals_unsharded(name):
    # A real inner optimizer inside shard_map: Adam's moments are sharded like the params
    # (varying over "data"), its count is replicated. The guard's skipped branch must return
    # the kept state and zero updates typed like the step's (shard_map checks it), and the
    # result must be the unsharded one, bit for bit on skipped steps.
    guard = {"skip_nonfinite": optclip.skip_nonfinite,
             "spike_ema": lambda i, **kw: optclip.skip_on_spike(i, warmup_steps=2, **kw),
             "spike_window": lambda i, **kw: optclip.skip_on_spike(i, window=2, **kw),
             "spike_window_both": lambda i, **kw: optclip.skip_on_spike(i, window=2, on="both",
                                                                        **kw)}[name]
    make = lambda **kw: guard(  # noqa: E731
        optax.chain(optclip.clip_by_global_norm(1.0, **kw), optax.adam(1e-2)), **kw)
    params = {"w": jnp.linspace(-1.0, 1.0, 16).reshape(8, 2), "b": jnp.ones(3)}
    pspec = {"w": PS("data"), "b": None}  # a mixed layout: "b" is replicated
    ref, tx = make(), make(partition_specs=pspec)
    state0 = tx.init(params)
    sspec = jax.tree.map(lambda x: PS("data") if x.shape == (8, 2) else PS(), state0)
    ispec = {"w": PS("data"), "b": PS()}
    step = jax.jit(jax.shard_map(lambda g, s, p: tx.update(g, s, p, value=jnp.asarray(1.0)),
                                 mesh=mesh1(), in_specs=(ispec, sspec, ispec),
                                 out_specs=(ispec, sspec)))
    s_ref, s = ref.init(params), state0
    for k, bad in enumerate([None, None, jnp.nan, None, jnp.inf, None]):
        g = {"w": jnp.full((8, 2), 0.3 + 0.05 * (k % 2)).at[3, 1].add(0.5),
             "b": jnp.full(3, -0.2)}  # no spike: only the non-finite steps are skipped
        if bad is not None:
            g["w"] = g["w"].at[6, 0].set(bad)  # on the 7th device's shard only
        before = s
        u_ref, s_ref = jax.jit(ref.update)(g, s_ref, params, value=jnp.asarray(1.0))
        u, s = step(g, s, params)
        assert bool(s.stats.skipped) == (bad is not None) == bool(s_ref.stats.skipped)
        for a, b in zip(jax.tree.leaves((u, s.inner_state)),
                        jax.tree.leaves((u_ref, s_ref.inner_state)), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
        if bad is not None:
            leaves_equal(s.inner_state, before.inner_state)
            np.testing.assert_array_equal(np.asarray(u["w"]), 0.0)


@needs8
def test_spike_decision_is_the_same_on_every_device():
    """skip_on_spike under shard_map and pmap: one decision per step, equal to one device's,
    even with a per-device loss (combined by a max, so the window stays replicated)."""
    steps = [1.0, 1.1, 0.9, 1.05, 20.0, 1.0, 0.95, 1.0]
    losses = [3.0, 2.9, 3.1, 2.95, 3.0, 9.0, 3.0, 2.9]
    make = lambda **kw: optclip.skip_on_spike(optax.sgd(1.0), window=4, on="both",  # noqa: E731
                                              z_thresh=3.0, **kw)
    ref_tx = make()
    s = ref_tx.init(jnp.ones((8, 2)))
    want = []
    for c, loss in zip(steps, losses, strict=True):
        _, s = ref_tx.update(jnp.full((8, 2), c), s, None, value=jnp.asarray(loss))
        want.append(bool(s.stats.skipped))
    assert want == [False] * 4 + [True, True, False, False]

    tx = make(axis_name="data")
    step = jax.jit(jax.shard_map(
        lambda g, s, lo: (lambda u, s: (s, s.stats.skipped[None]))(
            *tx.update(g, s, None, value=lo[0] - 0.001 * lax.axis_index("data"))),
        mesh=mesh1(), in_specs=(PS("data"), PS(), PS("data")), out_specs=(PS(), PS("data"))))
    s = tx.init(jnp.ones((8, 2)))
    got = []
    for c, loss in zip(steps, losses, strict=True):
        s, sk = step(jnp.full((8, 2), c), s, jnp.full((8,), loss))
        assert np.asarray(sk).all() or not np.asarray(sk).any()
        got.append(bool(np.asarray(sk)[0]))
    assert got == want

    txp = make(axis_name="i")
    ps = jax.tree.map(lambda x: jnp.stack([x] * 8), txp.init(jnp.ones((1, 2))))
    pstep = jax.pmap(lambda g, s, lo: txp.update(g, s, None, value=lo)[1], axis_name="i")
    got = []
    for c, loss in zip(steps, losses, strict=True):
        ps = pstep(jnp.full((8, 1, 2), c), ps, loss + 0.001 * jnp.arange(8.0))
        sk = np.asarray(ps.stats.skipped)
        assert sk.all() or not sk.any()
        for leaf in jax.tree.leaves(ps.history):  # the window is the same on every device
            leaf = np.asarray(leaf)
            np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[:1], leaf.shape))
        got.append(bool(sk[0]))
    assert got == want


# --- Task B: donation, errors, float64, records ----------------------------------------------

DONATE = {
    "skip_nonfinite": lambda: optclip.skip_nonfinite(optax.adam(1e-2)),
    **{f"spike_{w}_{on}": (lambda w=w, on=on: optclip.skip_on_spike(
        optax.adam(1e-2), window=w, on=on, max_consecutive=2))
       for w in (None, 4) for on in ("grad_norm", "loss", "both")},
}


@pytest.mark.parametrize("name", sorted(DONATE))
def test_fresh_state_can_be_donated(name):
    tx = DONATE[name]()
    x = {"w": jnp.ones(3)}
    step = jax.jit(lambda g, s: tx.update(g, s, x, value=jnp.asarray(1.0)),
                   donate_argnums=(1,))
    state = tx.init(x)
    ids = [id(leaf) for leaf in jax.tree.leaves(state)]
    assert len(set(ids)) == len(ids)
    _, state = step(x, state)  # raised "donate the same buffer twice" before
    _, state = step(x, state)
    assert not bool(state.stats.skipped)


@pytest.mark.parametrize("guard", [optclip.skip_nonfinite, optclip.skip_on_spike])
def test_errors_a_user_can_act_on(guard):
    with pytest.raises(TypeError, match=r"call it first.*optax\.adam\(1e-3\)"):
        guard(optax.adam)
    with pytest.raises(TypeError, match="wraps an optimizer"):
        guard(3.0)
    tx = guard(optax.adam(1e-3))
    x = jnp.ones(2)
    with pytest.raises(TypeError, match="state=None"):
        tx.update(x, None, x)
    with pytest.raises(TypeError, match="as its state"):
        tx.update(x, optax.adam(1e-3).init(x), x)
    other = (optclip.skip_on_spike if guard is optclip.skip_nonfinite
             else optclip.skip_nonfinite)(optax.adam(1e-3))
    with pytest.raises(TypeError, match="state of optclip.skip_.*as its state"):
        tx.update(x, other.init(x), x)


def test_state_of_another_skip_on_spike_configuration_is_refused():
    x = jnp.ones(2)
    a = optclip.skip_on_spike(optax.sgd(1.0), window=4)
    for b in (optclip.skip_on_spike(optax.sgd(1.0), window=8),
              optclip.skip_on_spike(optax.sgd(1.0), window=4, on="both"),
              optclip.skip_on_spike(optax.sgd(1.0))):
        with pytest.raises(ValueError, match="other settings"):
            a.update(x, b.init(x), x, value=1.0)


@pytest.mark.parametrize("call,match", [
    (lambda: optclip.skip_on_spike(optax.sgd(1.0), window=1), "window must be an int >= 2"),
    (lambda: optclip.skip_on_spike(optax.sgd(1.0), window=4.0), "window must be an int"),
    (lambda: optclip.skip_on_spike(optax.sgd(1.0), on="norm"), "on must be one of"),
    (lambda: optclip.skip_on_spike(optax.sgd(1.0), max_consecutive=0), "max_consecutive"),
    (lambda: optclip.skip_on_spike(optax.sgd(1.0), z_thresh=lambda c: 3.0), "z_thresh"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("window,scale", [(None, 1e100), (4, 1e100), (4, 1e300)])
def test_float64_norms_beyond_float32_range_are_compared_as_they_are(window, scale):
    with jax.enable_x64(True):
        tx = optclip.skip_on_spike(optax.sgd(1.0), window=window, warmup_steps=4,
                                   z_thresh=3.0)
        x = jnp.zeros(3, jnp.float64)
        step = jax.jit(tx.update)
        s = tx.init(x)
        skipped = []
        for k in range(10):
            c = scale * (1.0 + 0.05 * math.sin(k)) * (1e3 if k == 8 else 1.0)
            _, s = step(jnp.full(3, c, jnp.float64), s, x)
            skipped.append(bool(s.stats.skipped))
        assert skipped == [False] * 8 + [True, False]  # float32 statistics skipped them all
        assert not bool(s.stats.nonfinite)


def test_float64_ema_beyond_the_square_root_of_the_range_takes_every_step():
    # the EMA keeps a variance (squared units): at 1e300 it is inf and no spike is found,
    # but finite steps are never skipped as if they were not finite
    with jax.enable_x64(True):
        tx = optclip.skip_on_spike(optax.sgd(1.0), warmup_steps=4, z_thresh=3.0)
        x = jnp.zeros(3, jnp.float64)
        s = tx.init(x)
        for k in range(8):
            _, s = tx.update(jnp.full(3, 1e300 * (1.0 + 0.05 * math.sin(k))), s, x)
            assert not bool(s.stats.skipped)


@pytest.mark.parametrize("name", ["skip_nonfinite", "skip_on_spike"])
def test_records_counters_and_stale_inner_record(name):
    inner = optax.chain(optclip.clip_by_global_norm(1.0), optax.adam(1e-2))
    tx = (optclip.skip_nonfinite(inner) if name == "skip_nonfinite"
          else optclip.skip_on_spike(inner, window=4))
    step = jax.jit(lambda g, s: tx.update(g, s, x))
    x = jnp.zeros(2)
    s = tx.init(x)
    seen = []
    for g in ([3.0, 4.0], [jnp.nan, 1.0], [0.6, 0.8], [jnp.inf, 0.0]):
        before = optclip.stats(s)["clip_by_global_norm/grad_norm"]
        s = step(jnp.asarray(g), s)[1]
        st = optclip.stats(s, host=True)
        seen.append((st[f"{name}/nonfinite_count"], st[f"{name}/peak_grad_norm"],
                     st["clip_by_global_norm/stale"]))
        if st[f"{name}/skipped"]:  # the inner record is the last step taken, bit for bit
            assert st["clip_by_global_norm/grad_norm"] == float(before)
    assert seen == [(0, 5.0, False), (1, 5.0, True), (1, 5.0, False), (2, math.inf, True)]
