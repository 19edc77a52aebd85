"""Adaptive clippers: AGC, AutoClip, ZClip and AdaGC.

Each keeps a fixed-size pytree of arrays as state: no Python-side state, no
host sync, and the same shapes at every step, so that they run under ``jit``
and ``scan``, and checkpoint and restore bit-identically.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optclip import layers as _layers
from optclip import norms as _n
from optclip._common import (
    Threshold,
    check_range,
    check_state,
    check_threshold,
    concrete_scalar,
    f32,
    increment,
    is_python_number,
    maybe_raise_nonfinite,
    mul0,
    resolve,
    resolve_threshold,
    scale_leaf,
    scale_tree,
    transformation,
)
from optclip.layers import LayerAxis
from optclip.norms import AxisName
from optclip.static import applied_scale, clip_factors, global_scale
from optclip.stats import ClipStats

__all__ = [
    "AGCState",
    "AdaGCState",
    "AutoClipState",
    "ZClipState",
    "adagc",
    "agc",
    "autoclip",
    "zclip",
]


def _check_static_int(name: str, value: Any, lo: int, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, (jax.Array, jax.core.Tracer)):
        raise ValueError(
            f"{name} sets the shape of the state and must be a Python int. Under "
            f"optax.inject_hyperparams, name it in static_args=('{name}',)."
        )
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}; got {value!r}.")


def _check_warmup(value: Any) -> None:
    if isinstance(value, bool) or (is_python_number(value) and (value != int(value) or value < 1)):
        raise ValueError(f"warmup_steps must be an int >= 1; got {value!r}.")


def _flat_float(tree: Any) -> tuple[list[Any], Any, list[int]]:
    flat, treedef = jax.tree_util.tree_flatten(tree)
    idx = [i for i, x in enumerate(flat) if _n.is_float_leaf(x)]
    return flat, treedef, idx


def _ratio(after: jax.Array, before: jax.Array) -> jax.Array:
    pos = before > 0
    return jnp.where(pos, after / jnp.where(pos, before, 1), 1)


# ---------------------------------------------------------------------------------------------
# AGC


class AGCState(NamedTuple):
    """State of :func:`agc`: the step ``count`` (for schedules) and the stats."""

    count: jax.Array  # int32 []
    stats: ClipStats

    optclip_name = "agc"


def agc(
    clipping: Threshold = 0.01,
    eps: float = 1e-3,
    axis: int | tuple[int, ...] | None = None,
    *,
    axis_name: AxisName = None,
    partition_specs: Any = None,
    layer_axis: LayerAxis = None,
    error_if_nonfinite: bool = False,
) -> optax.GradientTransformation:
    """Adaptive gradient clipping, unit-wise against the parameters' norms.

    From Brock, De, Smith and Simonyan, *High-Performance Large-Scale Image
    Recognition Without Normalization*, ICML 2021
    (https://arxiv.org/abs/2102.06171), eq. 3: each unit ``i`` of a gradient
    is scaled so that ``||g_i|| <= clipping * max(||w_i||, eps)``.

    Units follow Flax's layouts: a 2-D ``(in, out)`` kernel has one unit per
    output column (reduce over axis 0), a conv kernel ``(..., in, out)`` one
    per output channel (reduce over all axes but the last), and a bias or
    scale vector is a single unit. Unlike ``optax.adaptive_grad_clip``, the
    division is by the exact unit norm (Optax floors it at 1e-6), the norms
    are overflow-safe, and ``(in, out, heads)`` 3-D kernels are reduced over
    their first two axes.

    Args:
      clipping: the largest allowed ratio of gradient to parameter unit norm:
        a float >= 0, a JAX scalar or a schedule. The paper uses 0.01 to 0.16
        depending on batch size.
      eps: the floor on parameter unit norms, so that zero-initialised
        parameters can move.
      axis: reduce these axes for every leaf of 2 or more dimensions instead
        of Flax's defaults; vectors and scalars stay a single unit.
      axis_name: inside ``shard_map``/``pmap``, mesh axes along which every
        leaf is split *along a reduced dim* (FSDP on the input dim): the unit
        norms of gradients and parameters are combined across them.
      partition_specs: inside ``shard_map``, every leaf's ``PartitionSpec``;
        a unit norm is combined only across the mesh axes that split a
        reduced dim, so tensor parallelism over output units needs no
        communication. Wins over ``axis_name``.
      layer_axis: for scanned (stacked) layers, the axis along which a leaf
        stacks L layers (an int, a pytree prefix or a callable; see
        :mod:`optclip.layers`). The units are then those of one layer: Flax's
        rules (or ``axis``) apply to the per-layer shape, the leaf's shape
        without the layer axis, and the layer axis is never reduced.
      error_if_nonfinite: raise on NaN or inf updates (see
        :func:`optclip.clip_by_global_norm`).

    Returns:
      An ``optax.GradientTransformation`` with an :class:`AGCState`. Its
      ``update`` needs ``params``. The stats hold the global L2 norm before,
      ``clipping`` as the threshold, the ratio of global norms after and
      before, and whether any unit was clipped.

    Raises:
      ValueError: for a negative or NaN ``clipping`` or ``eps``, or an invalid
        ``layer_axis``; at update time, when ``params`` are missing.

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> tx = optclip.agc(0.1)
      >>> w = {"kernel": jnp.ones((2, 2))}
      >>> u, _ = tx.update({"kernel": jnp.full((2, 2), 10.0)}, tx.init(w), w)
      >>> u["kernel"]  # unit norm sqrt(2) * 0.1 per column
      Array([[0.1, 0.1],
             [0.1, 0.1]], dtype=float32)
    """
    check_threshold("clipping", clipping)
    check_threshold("eps", eps)
    _layers.check_layer_axis(layer_axis)

    def init_fn(params):
        del params
        return AGCState(count=jnp.zeros((), jnp.int32), stats=ClipStats.zeros())

    def update_fn(updates, state, params=None):
        check_state(state, AGCState, "agc")
        if params is None:
            raise ValueError(
                "optclip.agc clips against the parameters' norms and needs them: call "
                "tx.update(grads, state, params)."
            )
        flat, treedef, idx = _flat_float(updates)
        try:
            pflat = treedef.flatten_up_to(params)
        except (ValueError, TypeError) as e:
            raise ValueError(
                "optclip.agc: params must have the structure of the updates (the gradients "
                f"of those very params): {e}"
            ) from None
        gs = [jnp.asarray(flat[i]) for i in idx]
        ws = [jnp.asarray(pflat[i]) for i in idx]
        for g, w, i in zip(gs, ws, idx, strict=True):
            if jnp.shape(g) != jnp.shape(w):
                path = jax.tree_util.keystr(
                    jax.tree_util.tree_flatten_with_path(updates)[0][i][0])
                raise ValueError(
                    f"optclip.agc: the gradient at {path or 'the root'} has shape "
                    f"{jnp.shape(g)} but its param has shape {jnp.shape(w)}; pass the params "
                    "the gradients belong to."
                )
        las = _layers.resolve_layer_axes(layer_axis, updates) or [None] * len(gs)
        axes = [_layers.unit_axes(g, la, axis) for g, la in zip(gs, las, strict=True)]
        c, invalid = resolve_threshold(clipping, state.count, name="clipping")
        if not gs:
            return updates, AGCState(count=increment(state.count), stats=state.stats)
        mesh_axes = _n.leaf_axes(updates, axis_name, partition_specs,
                                 reduce_axes=[tuple(range(g.ndim)) if a is None else a
                                              for g, a in zip(gs, axes, strict=True)])
        full_axes = _n.leaf_axes(updates, axis_name, partition_specs) or [None] * len(gs)
        flag_axes = _n.union_axes(full_axes)
        # one kernel (one overflow check, one rescue) for the gradients' and the params' units,
        # as one flat vector: the first half the gradients' units, the second the params'
        norms, _ = _n.norm_core(gs + ws, 2.0, axes=axes + axes,
                                axes_per_leaf=None if mesh_axes is None else mesh_axes * 2,
                                flag_axes=flag_axes, flat=True)
        lay = _n.layout_of(gs, axes)
        g_n, w_n = norms[:lay.total], norms[lay.total:]
        # a NaN or inf gradient element makes its unit's norm (a sum) NaN or inf
        nonfinite = _n.any_across(jnp.any(~jnp.isfinite(g_n)), flag_axes)
        maybe_raise_nonfinite(error_if_nonfinite, nonfinite, "agc")
        unit_thr = c.astype(g_n.dtype) * jnp.maximum(w_n, eps)
        scales = global_scale(g_n, unit_thr)
        # the leaves grouped by the mesh axes that still split their units (tensor
        # parallelism, or a split layer axis)
        groups: dict[Any, list[int]] = {}
        for j in range(len(gs)):
            red = set(_n.union_axes([mesh_axes[j]] if mesh_axes else []))
            other = tuple(a for a in _n.union_axes([full_axes[j]]) if a not in red)
            groups.setdefault(other, []).append(j)
        split_axes = _n.union_axes(list(groups))
        # one factor per unit (see clip_factors), broadcast against each leaf
        leaf_scales = _n.split_flat(scales, lay, full=[g.shape for g in gs])
        for other, js in groups.items():
            # inside shard_map the vector is typed as varying across every axis that splits
            # some units; a group whose units those axes do not split is marked replicated
            # there, so that a replicated leaf may leave with out_specs P()
            fix = tuple(a for a in split_axes if a not in other)
            if fix:
                ids = np.concatenate([np.arange(lay.offsets[j], lay.offsets[j] + lay.n_units[j])
                                      for j in js])
                fixed, o = _n.replicate(scales[ids], fix), 0
                for j in js:
                    leaf_scales[j] = fixed[o:o + lay.n_units[j]].reshape(lay.shapes[j])
                    o += lay.n_units[j]
        out = list(flat)
        for i, s_i in zip(idx, leaf_scales, strict=True):
            out[i] = scale_leaf(flat[i], s_i)
        # the stats' global norms: each group is combined once, then across its split axes
        before, after, any_clip = [], [], []
        for other, js in groups.items():
            if len(js) == len(gs):
                gn, sc = g_n, scales
            else:
                ids = np.concatenate([np.arange(lay.offsets[j], lay.offsets[j] + lay.n_units[j])
                                      for j in js])
                gn, sc = g_n[ids], scales[ids]
            any_clip.append(_n.any_across(jnp.any(sc != 1), other))
            before.append(_n.norm_across(_n.combine_norms(gn, 2.0), other))
            after.append(_n.norm_across(_n.combine_norms(mul0(gn, sc), 2.0), other))
        before = _n.combine_norms(jnp.stack(before), 2.0)
        after = _n.combine_norms(jnp.stack(after), 2.0)
        any_clip = jnp.any(jnp.stack(any_clip))
        # equal on every device now, but inside shard_map typed as varying across the axes
        # that split some units (they were read from one vector): marked replicated, so that
        # the state may leave shard_map with out_specs=P()
        if split_axes:
            before, after, any_clip = _n.replicate(
                jnp.stack([before, after, any_clip.astype(before.dtype)]), split_axes)
            any_clip = any_clip > 0
        stats = state.stats.advance(grad_norm=before, threshold=c, scale=_ratio(after, before),
                                    clipped=any_clip, nonfinite=nonfinite,
                                    invalid_threshold=invalid)
        return (jax.tree_util.tree_unflatten(treedef, out),
                AGCState(count=increment(state.count), stats=stats))

    return transformation(init_fn, update_fn, raises=error_if_nonfinite)


# ---------------------------------------------------------------------------------------------
# AutoClip

# The streaming sketch: log-spaced buckets with relative accuracy ALPHA, as in DDSketch
# (Masson, Rim and Lee, VLDB 2019). A value v > 0 falls in bucket ceil(log_gamma(v)); the
# bucket's representative 2 gamma^i / (gamma + 1) is within ALPHA of every value in it.
SKETCH_ALPHA = 0.005
SKETCH_MIN, SKETCH_MAX = 1e-30, 1e30
_GAMMA = (1 + SKETCH_ALPHA) / (1 - SKETCH_ALPHA)
_LOG_GAMMA = math.log(_GAMMA)
_I_MIN = math.floor(math.log(SKETCH_MIN) / _LOG_GAMMA)
_I_MAX = math.ceil(math.log(SKETCH_MAX) / _LOG_GAMMA)
SKETCH_BUCKETS = _I_MAX - _I_MIN + 2  # bucket 0 holds exact zeros


class AutoClipState(NamedTuple):
    """State of :func:`autoclip`.

    Attributes:
      count: int32 [], the number of norms recorded so far.
      history: with a window ``W``, float32 [W], the last W norms as a ring
        buffer (slot ``count % W`` is written next). Without one, int32
        [SKETCH_BUCKETS], the counts of the streaming quantile sketch.
      extremes: [2], the smallest and the largest finite norm recorded (inf and
        0 before any), so that the 0th and 100th percentiles, and the
        percentile of a single norm, are exact.
      stats: the latest :class:`ClipStats`.
    """

    count: jax.Array
    history: jax.Array
    extremes: jax.Array
    stats: ClipStats

    optclip_name = "autoclip"


def _interp(lo_v: jax.Array, hi_v: jax.Array, frac: jax.Array) -> jax.Array:
    return lo_v + (hi_v - lo_v) * frac


def _window_percentile(buf: jax.Array, n: jax.Array, q: jax.Array) -> jax.Array:
    """NumPy's default (linear) percentile of the first ``n`` valid entries of ``buf``."""
    w = buf.shape[0]
    valid = jnp.arange(w) < n
    s = jnp.sort(jnp.where(valid, buf, jnp.inf))
    pos = q / 100.0 * (n - 1).astype(jnp.float32)
    lo = jnp.floor(pos)
    frac = pos - lo
    lo_i = jnp.clip(lo.astype(jnp.int32), 0, w - 1)
    hi_i = jnp.clip(lo_i + 1, 0, jnp.maximum(n - 1, 0))
    return _interp(s[lo_i], s[hi_i], frac)


def _sketch_index(v: jax.Array) -> jax.Array:
    vv = jnp.clip(v, SKETCH_MIN, SKETCH_MAX)
    i = jnp.ceil(jnp.log(vv) / _LOG_GAMMA).astype(jnp.int32) - _I_MIN + 1
    return jnp.where(v > 0, jnp.clip(i, 1, SKETCH_BUCKETS - 1), 0)


def _sketch_value(i: jax.Array) -> jax.Array:
    k = (i + _I_MIN - 1).astype(jnp.float32)
    return jnp.where(i == 0, 0.0, 2.0 * jnp.exp(k * _LOG_GAMMA) / (_GAMMA + 1.0))


def _sketch_percentile(counts: jax.Array, n: jax.Array, q: jax.Array,
                       extremes: jax.Array) -> jax.Array:
    """The linear percentile of the ``n`` values counted in the sketch, exact at the extreme
    ranks (the smallest and largest values are kept exactly) and clamped between them."""
    lo_v, hi_v = extremes[0].astype(jnp.float32), extremes[1].astype(jnp.float32)
    last = jnp.maximum(n - 1, 0)
    pos = q / 100.0 * last.astype(jnp.float32)
    lo = jnp.floor(pos)
    frac = pos - lo
    cum = jnp.cumsum(counts)
    r0 = lo.astype(jnp.int32)
    r1 = jnp.minimum(r0 + 1, last)

    def value(r):
        # The bucket that holds the item of rank r (0-based) is the first with cum > r, so its
        # index is the number of buckets with cum <= r: one fused compare-and-count over the
        # buckets. (jnp.searchsorted's default binary search is a while loop, which a GPU runs
        # trip by trip, each trip its own launches and a check of its condition: it cost the
        # chain 0.5-0.7 ms a step on an H200, bench/results/h200_e3f0246/.)
        i = jnp.sum(cum <= r.astype(cum.dtype), dtype=jnp.int32)
        v = jnp.clip(_sketch_value(i), lo_v, hi_v)
        return jnp.where(r <= 0, lo_v, jnp.where(r >= last, hi_v, v))

    return _interp(value(r0), value(r1), frac)


def state_dtype(params: Any) -> jnp.dtype:
    """The float dtype of an adaptive clipper's statistics: the accumulation dtype of the
    params (float64 for float64 params, so that norms beyond float32's range stay finite),
    float32 when there are none."""
    leaves = _n.float_leaves(params) if params is not None else []
    return _n.acc_dtype(leaves) if leaves else jnp.dtype(jnp.float32)


def resolve_percentile(value: Any, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(q, invalid)``: a run-time percentile outside [0, 100] is clamped into it, and a
    NaN one acts as 0 (the smallest norm: it clips, it never lets a step through)."""
    q = resolve(value, count, name="percentile")
    invalid = jnp.isnan(q) | (q < 0) | (q > 100)
    return jnp.where(jnp.isnan(q), 0.0, jnp.clip(q, 0.0, 100.0)), invalid


def autoclip(
    percentile: Threshold = 10.0,
    history: int | None = None,
    *,
    axis_name: AxisName = None,
    partition_specs: Any = None,
    error_if_nonfinite: bool = False,
) -> optax.GradientTransformation:
    """AutoClip: clip the global norm to a percentile of the norms seen so far.

    From Seetharaman, Wichern, Pardo and Le Roux, *AutoClip: Adaptive Gradient
    Clipping for Source Separation Networks*, MLSP 2020
    (https://arxiv.org/abs/2007.14469). At each step the current global L2
    norm is added to the history, and the updates are clipped by global norm
    to the ``percentile``-th percentile of that history (the current norm
    included, as in the authors' code).

    Memory never grows with the step count:

    * ``history=W`` keeps the last W norms in a ring buffer; the percentile
      is exact, NumPy's default linear interpolation.
    * ``history=None`` (the default, the paper's "all norms so far") keeps a
      streaming quantile sketch of ``SKETCH_BUCKETS`` (about 14,000) int32
      counts: log-spaced buckets as in DDSketch, whose answer is within 0.5%
      (relative) of the exact percentile for norms in [1e-30, 1e30].
      Zero norms are counted exactly.

    Non-finite norms are not added to the history, so one NaN step does not
    poison every later threshold; the stats flag it.

    Args:
      percentile: in [0, 100]; the paper recommends 10. A float, JAX scalar
        or schedule.
      history: the window W (an int >= 1), or None for the whole history.
      axis_name: mesh axes across which the gradients are sharded, inside
        ``shard_map``/``pmap``.
      partition_specs: inside ``shard_map``, the ``PartitionSpec`` of every leaf
        (None for replicated ones), for trees of mixed layouts; see
        :func:`optclip.global_norm`. Wins over ``axis_name``.
      error_if_nonfinite: raise on NaN or inf updates.

    Returns:
      An ``optax.GradientTransformation`` with an :class:`AutoClipState`.

    Raises:
      ValueError: for a percentile outside [0, 100] or a bad ``history``.

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> tx = optclip.autoclip(50.0, history=3)
      >>> state = tx.init(None)
      >>> for g in (1.0, 3.0, 2.0, 10.0):
      ...     u, state = tx.update(jnp.array([g]), state)
      >>> float(state.stats.threshold), u  # median of (3, 2, 10)
      (3.0, Array([3.], dtype=float32))
    """
    check_range("percentile", percentile, 0.0, 100.0, hi_open=False)
    if not (is_python_number(percentile) or callable(percentile)
            or isinstance(percentile, jax.Array)):
        raise ValueError(f"percentile must be a number in [0, 100]; got {percentile!r}.")
    _check_static_int("history", history, 1, allow_none=True)

    def init_fn(params):
        dt = state_dtype(params)
        if history is None:
            hist = jnp.zeros((SKETCH_BUCKETS,), jnp.int32)
        else:
            hist = jnp.zeros((history,), dt)
        return AutoClipState(count=jnp.zeros((), jnp.int32), history=hist,
                             extremes=jnp.array([jnp.inf, 0.0], dt), stats=ClipStats.zeros())

    def update_fn(updates, state, params=None):
        del params
        check_state(state, AutoClipState, "autoclip")
        norm, nonfinite = _n.global_norm_and_flag(updates, axis_name=axis_name,
            partition_specs=partition_specs)
        maybe_raise_nonfinite(error_if_nonfinite, nonfinite, "autoclip")
        dt = state.extremes.dtype
        g = norm.astype(dt)
        record = jnp.isfinite(g)
        q, invalid = resolve_percentile(percentile, state.count)
        ext = jnp.where(record, jnp.stack([jnp.minimum(state.extremes[0], g),
                                           jnp.maximum(state.extremes[1], g)]), state.extremes)
        if history is None:
            hist = state.history.at[_sketch_index(f32(g))].add(record.astype(jnp.int32))
            n = jnp.where(record, increment(state.count), state.count)
            thr = _sketch_percentile(hist, n, q, ext).astype(dt)
            count = n
        else:
            slot = state.count % history
            hist = state.history.at[slot].set(jnp.where(record, g, state.history[slot]))
            n = jnp.minimum(jnp.where(record, increment(state.count), state.count), history)
            thr = _window_percentile(hist, n, q).astype(dt)
            # the count only places the next slot (count % W) and fills the window: near
            # int32's max it wraps to an equal slot in [W, 2W) instead of saturating
            top = jnp.iinfo(jnp.int32).max - history
            nxt = jnp.where(state.count < top, state.count + 1,
                            history + (state.count + 1 - history) % history)
            count = jnp.where(record, nxt, state.count)
        # Before any finite norm, there is nothing to clip to: let the step through.
        thr = jnp.where(n > 0, thr, jnp.inf)
        scale = global_scale(g, thr)
        factors = clip_factors(g, thr)
        updates = scale_tree(updates, factors)
        shown_scale = applied_scale(g, scale)
        stats = state.stats.advance(grad_norm=g, threshold=thr, scale=shown_scale,
                                    clipped=shown_scale != 1,
                                    nonfinite=nonfinite, invalid_threshold=invalid)
        return updates, AutoClipState(count=count, history=hist, extremes=ext, stats=stats)

    return transformation(init_fn, update_fn, raises=error_if_nonfinite)


# ---------------------------------------------------------------------------------------------
# ZClip and the z-score statistics shared with skip_on_spike


class EMAStats(NamedTuple):
    """Running mean and variance of a norm: Welford during warm-up, then an EMA."""

    count: jax.Array  # int32 [], finite norms recorded
    mean: jax.Array  # float32 []
    var: jax.Array  # float32 [], during warm-up the running sum of squared deviations (M2)

    @classmethod
    def zeros(cls, dtype: Any = jnp.float32) -> EMAStats:
        """Fresh statistics, each field its own buffer (so that the state can be donated)."""
        return cls(count=jnp.zeros((), jnp.int32), mean=jnp.zeros((), dtype),
                   var=jnp.zeros((), dtype))


def ema_warm(s: EMAStats, warmup_steps: Any) -> jax.Array:
    """True once the warm-up buffer has been folded into mean and variance."""
    return s.count >= warmup_steps


def ema_record(s: EMAStats, value: jax.Array, warmup_steps: Any, alpha: jax.Array,
               do: jax.Array) -> EMAStats:
    """Records ``value`` when ``do``: a warm-up sample, or an EMA step after warm-up.

    Warm-up uses Welford's update, so that at its end ``mean`` is the average
    of the buffered norms and ``var`` their population variance, exactly the
    quantities the ZClip reference computes from its buffer. After warm-up:
    ``mean <- alpha mean + (1 - alpha) v``, then ``var <- alpha var + (1 -
    alpha) (v - mean)**2`` with the *new* mean, as in the reference code.
    """
    warm = ema_warm(s, warmup_steps)
    n = (s.count + 1).astype(jnp.float32)
    delta = value - s.mean
    w_mean = s.mean + delta / n
    w_m2 = s.var + delta * (value - w_mean)
    last = s.count + 1 >= warmup_steps
    w_var = jnp.where(last, w_m2 / n, w_m2)
    e_mean = alpha * s.mean + (1 - alpha) * value
    e_var = alpha * s.var + (1 - alpha) * (value - e_mean) ** 2
    mean = jnp.where(warm, e_mean, w_mean)
    var = jnp.where(warm, e_var, w_var)
    return EMAStats(
        count=jnp.where(do, increment(s.count), s.count),
        mean=jnp.where(do, mean, s.mean).astype(s.mean.dtype),
        var=jnp.where(do, var, s.var).astype(s.var.dtype),
    )


class ZClipState(NamedTuple):
    """State of :func:`zclip`.

    Attributes:
      ema: the norm's running :class:`EMAStats` (count, mean, variance).
      stats: the latest :class:`ClipStats`.
    """

    ema: EMAStats
    stats: ClipStats

    optclip_name = "zclip"


_ZMODES = ("zscore", "percentile")
_ZOPTIONS = ("adaptive_scaling", "mean")


def _check_alpha(name: str, value: Any) -> None:
    check_range(name, value, 0.0, 1.0)
    if not (value is None or is_python_number(value) or callable(value)
            or isinstance(value, jax.Array)):
        raise ValueError(f"{name} must be a number in [0, 1); got {value!r}.")


def zclip(
    alpha: float = 0.97,
    z_thresh: float = 2.5,
    warmup_steps: int = 25,
    mode: str = "zscore",
    clip_option: str = "adaptive_scaling",
    clip_factor: float = 1.0,
    max_norm: Threshold | None = None,
    skip_update_on_spike: bool = False,
    axis_name: AxisName = None,
    partition_specs: Any = None,
    *,
    eps: float = 1e-6,
    error_if_nonfinite: bool = False,
) -> optax.GradientTransformation:
    """ZClip: clip global-norm spikes detected by an EMA z-score.

    From Kumar, Owen, Ashkboos and Chandar, *ZClip: Adaptive Spike Mitigation
    for LLM Pre-Training*, 2025 (https://arxiv.org/abs/2504.02507), step for
    step as the authors' reference code (``bluorion-com/ZClip``):

    * **Warm-up**: the first ``warmup_steps`` norms are recorded; at the end
      the mean is their average and the variance their population variance.
      During warm-up only ``max_norm`` clips, if given.
    * **z-score**: ``z = (g - mean) / (std + eps)``.
    * **Clip value** when ``z > z_thresh`` (``mode="zscore"``):
      ``clip_option="adaptive_scaling"`` gives
      ``clip_factor * (mean + z_thresh * std / (z / z_thresh))``;
      ``clip_option="mean"`` gives ``mean``. With ``mode="percentile"`` the
      clip value is ``mean + z_thresh * std`` whenever ``g`` exceeds it.
    * **Effective clip**: ``min(clip value or g, max_norm)``, applied as a
      global-norm clip.
    * **EMA update** with the clip value on a spike (or ``g`` otherwise):
      first the mean, then the variance with the new mean; skipped on spikes
      when ``skip_update_on_spike``.

    Deliberate differences from the reference: ``max_norm`` defaults to None
    (no fixed cap; the reference's default is 1.0, which would clip most
    large models on every step); the scale is ``clip / g`` exactly (the
    reference divides by ``g + 1e-6``); non-finite norms are not recorded.

    Args:
      alpha: the EMA's decay, in [0, 1).
      z_thresh: the z-score above which a norm is a spike (> 0).
      warmup_steps: norms recorded before the statistics start (>= 1).
      mode: ``"zscore"`` or ``"percentile"``.
      clip_option: ``"adaptive_scaling"`` or ``"mean"`` (zscore mode only).
      clip_factor: the multiplier of the adaptive threshold (> 0).
      max_norm: an optional fixed cap on the global norm: a float, a JAX
        scalar or a schedule.
      skip_update_on_spike: leave the statistics untouched on spikes.
      axis_name: mesh axes across which the gradients are sharded.
      partition_specs: inside ``shard_map``, the ``PartitionSpec`` of every leaf
        (None for replicated ones), for trees of mixed layouts; see
        :func:`optclip.global_norm`. Wins over ``axis_name``.
      eps: added to the standard deviation in the z-score.
      error_if_nonfinite: raise on NaN or inf updates.

    Returns:
      An ``optax.GradientTransformation`` with a :class:`ZClipState`. The
      stats' threshold is the norm the updates were clipped to on a clipped
      step, and otherwise the norm above which a clip would have engaged.

    Raises:
      ValueError: for an alpha outside [0, 1), ``warmup_steps < 1``, an
        unknown mode or option, or negative thresholds.

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> tx = optclip.zclip(warmup_steps=3)
      >>> state = tx.init(None)
      >>> for g in (1.0, 1.2, 0.8, 1.1, 50.0):
      ...     u, state = tx.update(jnp.array([g]), state)
      >>> bool(state.stats.clipped), float(u[0]) < 2.0
      (True, True)
    """
    _check_alpha("alpha", alpha)
    check_threshold("z_thresh", z_thresh)
    if is_python_number(z_thresh) and z_thresh == 0:
        raise ValueError("z_thresh must be > 0; got 0.")
    _check_warmup(warmup_steps)
    check_threshold("clip_factor", clip_factor)
    if concrete_scalar("clip_factor", clip_factor) == 0:
        raise ValueError("clip_factor must be > 0; got 0 (it would zero every clipped step).")
    check_threshold("max_norm", max_norm, allow_none=True)
    check_threshold("eps", eps)
    mode = mode.lower() if isinstance(mode, str) else mode
    if mode not in _ZMODES:
        raise ValueError(f"mode must be one of {_ZMODES}; got {mode!r}.")
    if not isinstance(clip_option, str) or clip_option.lower() not in _ZOPTIONS:
        raise ValueError(f"clip_option must be one of {_ZOPTIONS}; got {clip_option!r}.")
    clip_option = clip_option.lower()

    def init_fn(params):
        return ZClipState(ema=EMAStats.zeros(state_dtype(params)), stats=ClipStats.zeros())

    def update_fn(updates, state, params=None):
        del params
        check_state(state, ZClipState, "zclip")
        norm, nonfinite = _n.global_norm_and_flag(updates, axis_name=axis_name,
            partition_specs=partition_specs)
        maybe_raise_nonfinite(error_if_nonfinite, nonfinite, "zclip")
        ema = state.ema
        dt = ema.mean.dtype
        g = norm.astype(dt)  # the spike test runs in the statistics' dtype
        a = jnp.asarray(alpha, dt)
        zt = jnp.asarray(z_thresh, dt)
        if max_norm is None:
            cap, invalid = jnp.asarray(jnp.inf, dt), jnp.zeros((), bool)
        else:
            cap, invalid = resolve_threshold(max_norm, ema.count, dt, "max_norm")
        warm = ema_warm(ema, warmup_steps)
        std = jnp.sqrt(jnp.maximum(ema.var, 0.0))
        if mode == "percentile":
            bound = ema.mean + zt * std
            spike = g > bound
            clip_val = bound
        else:
            z = (g - ema.mean) / (std + eps)
            spike = z > zt
            if clip_option == "adaptive_scaling":
                eta = jnp.where(spike, z / zt, 1.0)
                clip_val = clip_factor * (ema.mean + zt * std / eta)
            else:
                clip_val = ema.mean
            bound = ema.mean + zt * (std + eps)
        spike = warm & spike & jnp.isfinite(g)
        effective = jnp.minimum(jnp.where(spike, clip_val, g), cap)
        thr = jnp.where(warm, effective, cap)
        # a clip value made negative or NaN at run time (a traced clip_factor) acts as 0
        invalid = invalid | jnp.isnan(thr) | (thr < 0)
        thr = jnp.where(jnp.isnan(thr), jnp.zeros_like(thr), jnp.maximum(thr, 0))
        scale = global_scale(g, thr)
        factors = clip_factors(g, thr)
        updates = scale_tree(updates, factors)
        record_value = jnp.where(warm & spike, clip_val, g)
        do = jnp.isfinite(g) & ~(spike & skip_update_on_spike)
        new_ema = ema_record(ema, record_value, warmup_steps, a, do)
        shown = jnp.where(scale != 1, thr, jnp.where(warm, jnp.minimum(bound, cap), cap))
        shown_scale = applied_scale(g, scale)
        stats = state.stats.advance(grad_norm=g, threshold=shown, scale=shown_scale,
                                    clipped=shown_scale != 1, nonfinite=nonfinite,
                                    invalid_threshold=invalid)
        return updates, ZClipState(ema=new_ema, stats=stats)

    return transformation(init_fn, update_fn, raises=error_if_nonfinite)


# ---------------------------------------------------------------------------------------------
# AdaGC


class AdaGCState(NamedTuple):
    """State of :func:`adagc`.

    Attributes:
      count: int32 [], steps so far.
      gamma: float32 [n_leaves], each float leaf's EMA of its clipped norm (in
        the order of ``jax.tree.leaves``); ``inf`` until the first step. With
        ``layer_axis``, one entry per layer: a stacked leaf of L layers holds
        L consecutive entries.
      stats: the latest :class:`ClipStats`.
    """

    count: jax.Array
    gamma: jax.Array
    stats: ClipStats

    optclip_name = "adagc"


def adagc(
    lambda_rel: Threshold = 1.05,
    beta: float = 0.98,
    warmup_steps: int = 100,
    lambda_abs: Threshold = 1.0,
    *,
    axis_name: AxisName = None,
    partition_specs: Any = None,
    layer_axis: LayerAxis = None,
    error_if_nonfinite: bool = False,
) -> optax.GradientTransformation:
    """AdaGC: per-tensor adaptive clipping against each tensor's EMA norm.

    From Wang et al., *AdaGC: Improving Training Stability for Large Language
    Model Pretraining*, 2025 (https://arxiv.org/abs/2502.11034).

    * For the first ``warmup_steps`` steps: global-norm clipping with
      ``h = min(lambda_abs / ||g||, 1)``; each tensor's ``gamma_i`` takes
      the running minimum of its clipped norm ``h ||g_i||``.
    * Afterwards: ``h_i = min(lambda_rel * gamma_i / ||g_i||, 1)`` and
      ``gamma_i <- beta gamma_i + (1 - beta) ||h_i g_i||``.

    The per-tensor statistics are not updated on a step with NaN or inf
    gradients (the stats flag it).

    Args:
      lambda_rel: the allowed ratio of a tensor's norm to its EMA (>= 0).
      beta: the EMA's decay, in [0, 1).
      warmup_steps: the global-clipping warm-up (>= 1).
      lambda_abs: the global-norm threshold during warm-up (>= 0).
      axis_name: inside ``shard_map``/``pmap``, the mesh axes along which
        *every* float leaf is sharded (see :func:`optclip.clip_by_leaf_norm`).
      partition_specs: inside ``shard_map``, the ``PartitionSpec`` of every leaf
        (None for replicated ones), for trees of mixed layouts; see
        :func:`optclip.global_norm`. Wins over ``axis_name``.
      layer_axis: for scanned (stacked) layers, the axis along which a leaf
        stacks L layers (an int, a pytree prefix or a callable; see
        :mod:`optclip.layers`): each layer is a tensor of its own, with its
        own norm, threshold and EMA. ``init`` reads the layout from
        ``params``. With the layer axis split across devices inside
        ``shard_map`` (named in ``partition_specs``), the per-layer norms are
        gathered, so the state stays replicated and equals the unsharded one.
      error_if_nonfinite: raise on NaN or inf updates.

    Returns:
      An ``optax.GradientTransformation`` with an :class:`AdaGCState`. The
      stats' threshold is ``lambda_abs`` during warm-up and afterwards the L2
      norm of the per-tensor thresholds ``lambda_rel * gamma``.

    Raises:
      ValueError: for a beta outside [0, 1), ``warmup_steps < 1``,
        negative thresholds or an invalid ``layer_axis``.

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> tx = optclip.adagc(warmup_steps=1)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> _, state = tx.update({"w": jnp.array([0.3, 0.4])}, state)
      >>> u, state = tx.update({"w": jnp.array([30.0, 40.0])}, state)
      >>> u["w"]  # clipped to 1.05 times the tensor's EMA norm, 0.5
      Array([0.315, 0.42 ], dtype=float32)
    """
    check_threshold("lambda_rel", lambda_rel)
    check_threshold("lambda_abs", lambda_abs)
    _check_alpha("beta", beta)
    _check_warmup(warmup_steps)
    _layers.check_layer_axis(layer_axis)

    def n_tensors(tree: Any) -> int:
        """The number of tensors: float leaves, each stacked one counting as its layers."""
        xs = [jnp.asarray(x) for x in _n.float_leaves(tree)] if tree is not None else []
        las = _layers.resolve_layer_axes(layer_axis, tree) if xs else None
        return _n.layout_of(xs, _layers.reduce_axes(xs, las)).total

    def init_fn(params):
        n = n_tensors(params)
        return AdaGCState(count=jnp.zeros((), jnp.int32),
                          gamma=jnp.full((n,), jnp.inf, jnp.float32), stats=ClipStats.zeros())

    def update_fn(updates, state, params=None):
        del params
        check_state(state, AdaGCState, "adagc")
        flat, treedef, idx = _flat_float(updates)
        xs = [jnp.asarray(flat[i]) for i in idx]
        las = _layers.resolve_layer_axes(layer_axis, updates)
        if not xs:
            if state.gamma.shape[0]:
                raise ValueError(
                    f"adagc was initialised with {state.gamma.shape[0]} tensors but the "
                    "updates have none: init it with the params the updates belong to.")
            return updates, state._replace(count=increment(state.count))
        ln = _layers.layer_norms(xs, 2.0, las, updates, axis_name=axis_name,
                                 partition_specs=partition_specs)
        norms, nonfinite = ln.norms, ln.nonfinite
        if norms.shape[0] != state.gamma.shape[0]:
            what = "tensors (float leaves, each stacked leaf counting as its layers)" \
                if las is not None else "float leaves"
            raise ValueError(
                f"adagc was initialised with {state.gamma.shape[0]} {what} but the updates "
                f"have {norms.shape[0]}: init it with the params the updates belong to (and "
                "the same layer_axis)."
            )
        maybe_raise_nonfinite(error_if_nonfinite, nonfinite, "adagc")
        gnorm = _n.combine_norms(norms, 2.0)
        warm = state.count < warmup_steps
        lam_abs, bad_abs = resolve_threshold(lambda_abs, state.count, norms.dtype, "lambda_abs")
        lam_rel, bad_rel = resolve_threshold(lambda_rel, state.count, norms.dtype, "lambda_rel")
        h_global = global_scale(gnorm, lam_abs)
        # gamma is inf before a tensor's first step: 0 * inf is no threshold, 0 is
        rel_thr = jnp.where(lam_rel == 0, jnp.zeros_like(state.gamma, norms.dtype),
                            lam_rel * state.gamma.astype(norms.dtype))
        h_local = global_scale(norms, rel_thr)
        h = jnp.where(warm, jnp.broadcast_to(h_global, norms.shape), h_local)
        factors = jnp.where(warm, jnp.broadcast_to(clip_factors(gnorm, lam_abs),
                                                   norms.shape + (2,)),
                            clip_factors(norms, rel_thr))
        # gamma learns the clipped norms through the pair of factors (see clip_factors): h *
        # norms is 0 where h is below float32's smallest normal (a norm of 1e38), and pulled
        # gamma to 0 for good. (The leaves take h itself, one factor each.)
        clipped_norms = mul0(norms * factors[..., 0], factors[..., 1]).astype(jnp.float32)
        gamma = jnp.where(warm, jnp.minimum(state.gamma, clipped_norms),
                          beta * state.gamma + (1 - beta) * clipped_norms)
        # a norm beyond float32's range (inf from finite elements) says nothing of the scale
        # either: gamma is kept, as on a non-finite step
        gamma = jnp.where(nonfinite | ~jnp.isfinite(gnorm), state.gamma, gamma)
        out = list(flat)
        for i, h_i in zip(idx, ln.split(h), strict=True):
            out[i] = scale_leaf(flat[i], h_i)
        after = _n.combine_norms(mul0(norms, h), 2.0)
        thr = jnp.where(warm, lam_abs, _n.combine_norms(rel_thr, 2.0))
        stats = state.stats.advance(grad_norm=gnorm, threshold=thr,
                                    scale=_ratio(after, gnorm), clipped=jnp.any(h != 1),
                                    nonfinite=nonfinite,
                                    invalid_threshold=jnp.where(warm, bad_abs, bad_rel))
        return (jax.tree_util.tree_unflatten(treedef, out),
                AdaGCState(count=increment(state.count), gamma=gamma, stats=stats))

    return transformation(init_fn, update_fn, raises=error_if_nonfinite)
