"""Static clippers: global p-norm, per-element value, per-leaf norm, block RMS.

Each returns an ``optax.GradientTransformation`` whose state holds a step
``count`` (for schedules) and a :class:`~optclip.ClipStats` record.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optclip import layers as _layers
from optclip import norms as _n
from optclip._common import (
    Threshold,
    as_varying,
    check_state,
    check_threshold,
    concrete_scalar,
    increment,
    is_python_number,
    maybe_raise_nonfinite,
    mul0,
    resolve,
    resolve_threshold,
    scale_leaf,
    scale_tree,
    transformation,
    vma_of,
)
from optclip.layers import LayerAxis
from optclip.norms import AxisName, Ord
from optclip.stats import ClipStats

__all__ = [
    "ClipState",
    "clip_by_global_norm",
    "clip_by_value",
    "clip_by_leaf_norm",
    "clip_by_block_rms",
]


class ClipState(NamedTuple):
    """State of a static clipper.

    Attributes:
      count: int32 scalar, the number of updates so far (drives schedules).
      stats: the latest :class:`ClipStats`.
    """

    count: jax.Array
    stats: ClipStats


class GlobalNormClipState(ClipState):
    optclip_name = "clip_by_global_norm"


class ValueClipState(ClipState):
    optclip_name = "clip_by_value"


class LeafNormClipState(ClipState):
    optclip_name = "clip_by_leaf_norm"


class BlockRMSClipState(ClipState):
    optclip_name = "clip_by_block_rms"


def _init_fn(state_cls: type[ClipState]):
    def init_fn(params: Any) -> ClipState:
        del params
        return state_cls(count=jnp.zeros((), jnp.int32), stats=ClipStats.zeros())

    return init_fn


TINY = 2.0 ** -126
"""float32's smallest normal number: a clip factor below it is applied as ``TINY`` times a
factor in [2^-126, 1) (see :func:`clip_factors`)."""


def global_scale(norm: jax.Array, max_norm: jax.Array) -> jax.Array:
    """``min(1, max_norm / norm)``, NaN-free at 0, with a zero threshold giving exactly 0.

    The division goes through a ``where`` whose untaken branch divides by 1,
    so the value and the derivative are finite at ``norm == 0``. With
    ``max_norm == 0`` the scale is 0 for every norm, so the clipped update is
    identically zero and so is its derivative. ``max_norm`` must already be
    >= 0 (see :func:`optclip._common.resolve_threshold`). This is the value
    for the stats; the updates are scaled by :func:`clip_factors`.
    """
    max_norm = max_norm.astype(norm.dtype)
    over = (norm > max_norm) | (max_norm == 0)
    safe = over & (norm > 0)
    scale = jnp.where(over, max_norm / jnp.where(safe, norm, 1), 1)
    return scale.astype(norm.dtype)


def clip_factors(norm: jax.Array, max_norm: jax.Array) -> jax.Array:
    """:func:`global_scale` as two factors ``(a, b)``, stacked on a last axis of 2: the
    clipped update is ``x * a * b`` (:func:`optclip._common.scale_leaf`).

    Clipping a norm of 1e38 to 1 takes a factor of 1e-38, below float32's
    smallest normal number ``TINY`` (2^-126), which XLA:CPU flushes to 0: the
    update, whose true value is of the order of the threshold, would be
    zeroed. Such a factor is applied as ``a = TINY`` and ``b = max_norm /
    (norm * TINY)``, computed without forming the factor itself: ``b`` is in
    [2^-126, 1) for any factor down to 2^-252, and as ``a`` is at least the
    factor, ``x * a`` is below the smallest normal only where the true result
    is too. A factor below 2^-252 (a threshold below about 1e-37 against a
    norm near float32's largest) still flushes. Any other factor is ``a =
    1``, ``b = global_scale``: the same result, bit for bit.

    The global clippers scale every leaf by one pair (:func:`optclip._common.
    scale_tree`): two multiplies per leaf. The per-leaf and unit-wise clippers
    apply one factor per leaf or unit: a second value per unit, handed to
    every small leaf by its selection, made their update on 1,000 leaves
    compile 24-35% slower (``python -m bench --many-trees many1000`` at
    61eeb3f), so their factors below 2^-126 still flush on CPU (README,
    Limits). They take the pair for what they compute from the clipped norms
    (adagc's EMA).
    """
    scale = global_scale(norm, max_norm)
    max_norm = max_norm.astype(norm.dtype)
    down = norm * TINY  # exact: a power of two (0 where it would be subnormal)
    tiny = (max_norm > 0) & (max_norm < down) & jnp.isfinite(norm)
    a = jnp.where(tiny, jnp.asarray(TINY, norm.dtype), jnp.ones_like(norm))
    b = jnp.where(tiny, max_norm / jnp.where(tiny, down, 1), scale)
    a, b = jnp.broadcast_arrays(a, b)
    return jnp.stack([a, b], axis=-1).astype(norm.dtype)


def applied_scale(norm: jax.Array, scale: jax.Array) -> jax.Array:
    """The scale as the stats report it: the output's norm over the input's, so 1 for a zero
    input (which is left unchanged, even when the multiplier applied to it was 0)."""
    return jnp.where(norm > 0, scale, jnp.ones_like(scale))


def lift_scale(norm: jax.Array, min_norm: jax.Array, scale: jax.Array, factors: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """The ``min_norm`` lift of a non-zero norm below ``min_norm``, as two finite factors.

    ``min_norm / norm`` overflows float32 for a tiny norm (``1e20 / 1e-20``),
    and ``x * inf`` is inf or NaN. The lift is applied as ``x * pre * post``:
    ``pre``, a power of two, brings the norm into [2, 4) exactly, and
    ``post = min_norm / (norm * pre)`` is then finite. Returns ``(factors,
    total)``, with ``total`` the whole factor for the stats (inf there when
    it overflows); where no lift applies, ``(pre, post)`` are the clip's
    ``factors`` (:func:`clip_factors`) and ``total`` its ``scale``.
    ``(pre, post)`` are returned stacked on a last axis, as
    :func:`clip_factors` returns its pair.
    """
    min_norm = min_norm.astype(norm.dtype)
    under = (norm > 0) & (norm < min_norm)
    down, _ = _n._pow2_scale(norm)
    r = norm * down
    pre = jnp.where(under, down, factors[..., 0])
    post = jnp.where(under, min_norm / jnp.where(under, r, 1), factors[..., 1])
    total = jnp.where(under, min_norm / jnp.where(under, norm, 1), scale)
    return jnp.stack([pre, post], axis=-1), total


def clip_by_global_norm(
    max_norm: Threshold,
    *,
    ord: Ord = _n.L2,
    min_norm: Threshold | None = None,
    axis_name: AxisName = None,
    partition_specs: Any = None,
    error_if_nonfinite: bool = False,
) -> optax.GradientTransformation:
    """Scales all updates together so that their global p-norm is at most ``max_norm``.

    The updates are multiplied by ``scale = min(1, max_norm / g)``, where ``g``
    is the global p-norm of all float leaves, as proposed by Pascanu, Mikolov
    and Bengio, *On the difficulty of training recurrent neural networks*,
    ICML 2013 (https://arxiv.org/abs/1211.5063). The direction is kept.

    Where this differs from ``optax.clip_by_global_norm``:

    * the norm is accumulated in float32 and overflow-safe, so fp16 and bf16
      gradients are clipped by their true norm (Optax gets ``inf`` and
      returns all zeros);
    * a zero gradient with ``max_norm=0`` gives zeros, not NaN, and the
      derivative of the update at ``g = 0`` is finite;
    * any p-norm, a schedule as threshold, and stats in the state.

    Like ``torch.nn.utils.clip_grad_norm_``, any ``ord`` is accepted and the
    total norm is returned (in the stats); torch adds 1e-6 to the norm in its
    divisor, optclip divides by the exact norm.

    Args:
      max_norm: the largest global norm let through: a float >= 0, a JAX
        scalar, or an Optax schedule of the step count. ``inf`` never clips.
      ord: the norm: 1, 2 (default), ``math.inf`` or any real p >= 1.
      min_norm: if set, non-zero updates whose norm is below it are scaled
        *up* to ``min_norm``. This is normalisation; it does not cure
        vanishing gradients, whose direction is as uninformative after the
        rescale as before it. A zero update stays zero.
      axis_name: inside ``shard_map`` or ``pmap``, the mesh axis (or tuple of
        axes) across which the tree is sharded; the partial norms are summed
        across it so that every shard is scaled by the same global norm.
        Leave ``None`` under plain ``jit``, sharded or not.
      partition_specs: inside ``shard_map``, the ``PartitionSpec`` of every leaf
        (None for replicated ones), for trees of mixed layouts; see
        :func:`optclip.global_norm`. Wins over ``axis_name``.
      error_if_nonfinite: raise ``FloatingPointError`` (through
        ``jax.debug.callback``) when the updates hold NaN or inf. For
        debugging: it costs one device-to-host copy per step.

    Returns:
      An ``optax.GradientTransformation`` whose state is a
      :class:`GlobalNormClipState` with the step count and the stats.

    Raises:
      ValueError: for a negative or NaN threshold, ``min_norm > max_norm``,
        or an unknown ``ord``.

    Example:
      >>> import jax.numpy as jnp, optax, optclip
      >>> tx = optclip.clip_by_global_norm(1.0)
      >>> state = tx.init(None)
      >>> updates, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)
      >>> updates["w"]
      Array([0.6, 0.8], dtype=float32)
      >>> float(state.stats.grad_norm), bool(state.stats.clipped)
      (5.0, True)
    """
    check_threshold("max_norm", max_norm)
    check_threshold("min_norm", min_norm, allow_none=True)
    lo_c, hi_c = concrete_scalar("min_norm", min_norm), concrete_scalar("max_norm", max_norm)
    if lo_c is not None and hi_c is not None and lo_c > hi_c:
        raise ValueError(
            f"min_norm must be <= max_norm (min_norm={min_norm!r}, max_norm={max_norm!r})."
        )
    p = _n.check_ord(ord)

    def update_fn(updates, state, params=None):
        del params
        check_state(state, GlobalNormClipState, "clip_by_global_norm")
        norm, nonfinite = _n.global_norm_and_flag(updates, p, axis_name=axis_name,
            partition_specs=partition_specs)
        max_n, invalid = resolve_threshold(max_norm, state.count, norm.dtype, "max_norm")
        scale = global_scale(norm, max_n)
        factors = clip_factors(norm, max_n)
        if min_norm is not None:
            min_n, bad_min = resolve_threshold(min_norm, state.count, norm.dtype, "min_norm")
            invalid = invalid | bad_min
            # a run-time min_norm above max_norm is held to max_norm
            factors, scale = lift_scale(norm, jnp.minimum(min_n, max_n), scale, factors)
        updates = scale_tree(updates, factors)
        # finite inputs give finite outputs (the lift is applied as two finite factors)
        maybe_raise_nonfinite(error_if_nonfinite, nonfinite, "clip_by_global_norm")
        scale = applied_scale(norm, scale)
        stats = state.stats.advance(grad_norm=norm, threshold=max_n, scale=scale,
                                    clipped=scale != 1, nonfinite=nonfinite,
                                    invalid_threshold=invalid)
        return updates, GlobalNormClipState(count=increment(state.count), stats=stats)

    return transformation(_init_fn(GlobalNormClipState), update_fn, raises=error_if_nonfinite)


def _clip_leaf(x: Any, lo: jax.Array, hi: jax.Array) -> Any:
    if not _n.is_float_leaf(x):
        return x
    x = jnp.asarray(x)
    if jnp.iscomplexobj(x):
        return jax.lax.complex(_clip_leaf(x.real, lo, hi), _clip_leaf(x.imag, lo, hi))
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    clipped = jnp.clip(wide, lo.astype(wide.dtype), hi.astype(wide.dtype))
    # NaN and inf are not clamped into plausible values: they stay visible.
    return jnp.where(jnp.isfinite(wide), clipped, wide).astype(x.dtype)


def _clamp_for_norm(x: Any, lo: jax.Array, hi: jax.Array, symmetric: bool,
                    for_max: bool = False) -> Any:
    """Values whose magnitudes are those of :func:`_clip_leaf`'s output, for its norm.

    Written differently from the clamp itself (for ``[-hi, hi]``, ``min(|x|, hi)``), so
    that XLA does not share one expression between the norm and the optimizer's
    element-wise pass: shared, the clamped tree would be written out in full for both.
    Plain min and max also keep the reduction on the backends' fast reduce kernels.
    ``for_max`` gives the same values by yet another expression (see ``norm_core``).
    """
    if not _n.is_float_leaf(x):
        return x
    x = jnp.asarray(x)
    if jnp.iscomplexobj(x):
        return jax.lax.complex(_clamp_for_norm(x.real, lo, hi, symmetric, for_max),
                               _clamp_for_norm(x.imag, lo, hi, symmetric, for_max))
    w = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    lo, hi = lo.astype(w.dtype), hi.astype(w.dtype)
    if symmetric:
        return jnp.minimum(jnp.maximum(w, -hi), hi) if for_max else jnp.minimum(jnp.abs(w), hi)
    return jnp.minimum(jnp.maximum(w, lo), hi) if for_max else jnp.maximum(jnp.minimum(w, hi), lo)


def _value_clamped(leaves: list[jax.Array], lo: jax.Array, hi: jax.Array, symmetric: bool,
                   nonfinite: jax.Array) -> jax.Array:
    """Whether some finite element lies outside [lo, hi].

    On a finite step this is one max reduction: the largest magnitude compared with ``hi``
    (exact), or, with a ``min_value``, the largest of ``max(x - hi, lo - x)`` compared with 0
    (exact but where ``x`` and a bound are distinct floats below about 1e-38, whose
    difference a backend that flushes subnormals may take as 0). Plain max reductions stay on
    every backend's fast reduce kernels and, beside the norms' sums, cost about one more read
    of the updates. A NaN would poison the max, so on a non-finite step (a ``lax.cond`` on the
    flag the norm already gives) a boolean ``any`` of the finite elements outside the bounds
    decides instead: a NaN does not hide a clamp beside it. The small leaves are
    concatenated once, for both branches, so that compile time stays linear in the number
    of leaves.
    """
    parts = []
    for x in leaves:
        if x.size:
            parts += [x.real, x.imag] if jnp.iscomplexobj(x) else [x]
    if not parts:
        return jnp.zeros((), bool)
    wide = [v.astype(jnp.promote_types(v.dtype, jnp.float32)) for v in parts]
    lo_, hi_ = lo.astype(wide[0].dtype), hi.astype(wide[0].dtype)
    # the small arrays concatenated once, outside the cond, for both of its branches (each
    # concatenated them again: a concatenation of many arrays is compiled on its own)
    small = [v.ravel() for v in wide if v.size <= _n.SMALL_LEAF]
    if len(small) > 1:
        wide = [v for v in wide if v.size > _n.SMALL_LEAF] + [jnp.concatenate(small)]

    def finite_step():
        if symmetric:
            return _n.grouped_total(wide, None, lambda v, sc: jnp.abs(v), _n._max0) > hi_
        # each leaf with its own copy of the bounds (see norms.own_copies)
        over = _n.grouped_total(wide, (lo_, hi_), lambda v, b: jnp.maximum(v - b[1], b[0] - v),
                                _max_or_minus_inf)
        return over > 0

    def outside(v):
        return jnp.isfinite(v) & ((v > hi_) | (v < lo_))

    def nonfinite_step():
        # Sliced on XLA:CPU only, where a boolean reduction writes its operand out. Elsewhere
        # one boolean reduction per leaf, which fuses: and a slice at a traced offset along a
        # sharded dimension would make XLA gather the whole leaf (under jit with
        # NamedSharding; on CPU too, on a non-finite step).
        return lax.platform_dependent(
            cpu=lambda: _chunked_any(wide, outside),
            default=lambda: _n.grouped_total(wide, None, lambda v, sc: outside(v),
                                             jnp.any).astype(bool))

    return jax.lax.cond(nonfinite, nonfinite_step, finite_step)


# The non-finite step's clamp flag takes 1/_ANY_CHUNKS of the updates at a time (see
# _chunked_any): a copy of that much, and its mask, are all it holds at once.
_ANY_CHUNKS = 256
_INT32_MAX = 2**31 - 1


def _chunked_any(vals: list[jax.Array], pred, chunks: int = _ANY_CHUNKS) -> jax.Array:
    """Whether ``pred`` holds for some element of some array, ``chunks`` slices at a time.

    A boolean reduction's operand is written out in full on XLA:CPU (a 1-byte mask the size
    of the arrays: a quarter of float32 updates). One loop takes slice ``i`` of every array
    at step ``i``, so that only ``1/chunks`` of the arrays and of the mask exist at once; the
    last slice of an array that does not divide evenly starts earlier and overlaps the one
    before it, which an ``any`` does not mind. The slices are concatenated, and reduced
    once: a boolean reduction per array compiles to several kernels each on XLA:CPU, and
    for a model's hundreds of leaves cost more compile time than the rest of the clipper.
    The price is paid on non-finite steps only: on the GPT-2 tree, XLA:CPU, such a step of
    ``chain(clip_by_value, adam)`` takes 2.5x a finite one (``python -m bench.xla_probe
    value``). Used on
    CPU only (see ``_value_clamped``): under jit with ``NamedSharding`` on CPU devices, a
    slice at a traced offset along a sharded dimension makes XLA gather that leaf whole, in
    each loop step of a non-finite step.
    """
    dtype = jnp.result_type(*vals) if vals else jnp.float32
    # A slice's offset is an int32: a leaf of 2**31 elements or more is reduced whole.
    huge = [jnp.any(pred(v)) for v in vals if v.size >= _INT32_MAX]
    # (its caller hands the small arrays in concatenated already)
    flat = [v.ravel().astype(dtype) for v in vals if 0 < v.size < _INT32_MAX]
    init = jnp.any(jnp.stack(huge)) if huge else jnp.zeros((), bool)
    if not flat:
        return init
    widths = [-(-v.size // chunks) for v in flat]

    def step(i, acc):
        parts = [lax.dynamic_slice(v, (jnp.minimum(i * w, v.size - w),), (w,))
                 for v, w in zip(flat, widths, strict=True)]
        return acc | jnp.any(pred(jnp.concatenate(parts) if len(parts) > 1 else parts[0]))

    # The carry typed as the body's result is: inside shard_map, varying along every
    # array's mesh axes and those of whatever ``pred`` closes over (the bounds), read off
    # ``pred`` of one element (traced for its type only: XLA drops it). Taking the first
    # slices outside the loop for the type, as before, compiled the body's kernels twice.
    have = vma_of(init)
    probe = pred(lax.slice(flat[0], (0,), (1,)))
    init = as_varying(init, have, have.union(vma_of(probe), *(vma_of(v) for v in flat)))
    return lax.fori_loop(0, chunks, step, init)


def _max_or_minus_inf(x: jax.Array) -> jax.Array:
    """The max of ``x``; -inf for an empty array."""
    return jnp.max(x, initial=jnp.asarray(-jnp.inf, x.dtype))


def clip_by_value(
    max_value: Threshold,
    min_value: Threshold | None = None,
    *,
    axis_name: AxisName = None,
    partition_specs: Any = None,
    error_if_nonfinite: bool = False,
) -> optax.GradientTransformation:
    """Clamps every element of the updates to ``[min_value, max_value]``.

    Per-element clipping, as in Mikolov's RNN language models and Keras's
    ``clipvalue``. Unlike norm clipping it changes the direction of the
    update. Complex leaves are clamped part by part (real and imaginary).
    Unlike ``optax.clip``, NaN and inf elements are not clamped into finite,
    plausible values: they pass through, and the stats flag them (wrap the
    optimizer in :func:`optclip.skip_nonfinite` to skip such steps).
    The comparison is done in float32 or wider, so a bound beyond fp16's range
    simply never clips an fp16 leaf.

    Args:
      max_value: the upper bound: a float, a JAX scalar, or a schedule.
      min_value: the lower bound; defaults to ``-max_value``.
      axis_name: inside ``shard_map``/``pmap``, the mesh axes along which the
        leaves are split. The clamp itself is element-wise and needs none:
        this only makes the stats global.
      partition_specs: per leaf, its ``PartitionSpec`` (see
        :func:`optclip.global_norm`), for the same purpose.
      error_if_nonfinite: raise on NaN or inf updates (see
        :func:`clip_by_global_norm`).

    Returns:
      An ``optax.GradientTransformation`` with a :class:`ValueClipState`. Its
      stats hold the global L2 norm before the clamp, ``max_value`` as the
      threshold, the ratio of the norms after and before as the scale, and
      whether any element was clamped.

    Raises:
      ValueError: for a NaN bound, a negative ``max_value`` without
        ``min_value``, or ``min_value > max_value``.

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> tx = optclip.clip_by_value(1.0)
      >>> updates, _ = tx.update(jnp.array([-3.0, 0.5, 2.0]), tx.init(None))
      >>> updates
      Array([-1. ,  0.5,  1. ], dtype=float32)
    """
    if min_value is None:
        check_threshold("max_value", max_value)
    else:
        for name, v in (("max_value", max_value), ("min_value", min_value)):
            if isinstance(v, bool) or not (is_python_number(v) or callable(v)
                                           or isinstance(v, (jax.Array, np.ndarray))):
                raise ValueError(f"{name} must be a number, a JAX scalar or a schedule; "
                                 f"got {v!r}.")
            c = concrete_scalar(name, v)
            if c is not None and math.isnan(c):
                raise ValueError(f"{name} must not be NaN.")
        lo_c = concrete_scalar("min_value", min_value)
        hi_c = concrete_scalar("max_value", max_value)
        if lo_c is not None and hi_c is not None and lo_c > hi_c:
            raise ValueError(
                f"min_value must be <= max_value; got min_value={min_value!r}, "
                f"max_value={max_value!r}."
            )

    def update_fn(updates, state, params=None):
        del params
        check_state(state, ValueClipState, "clip_by_value")
        if min_value is None:
            hi, invalid = resolve_threshold(max_value, state.count, name="max_value")
            lo = -hi
        else:
            hi = resolve(max_value, state.count, name="max_value")
            lo = resolve(min_value, state.count, name="min_value")
            invalid = jnp.isnan(hi) | jnp.isnan(lo) | (lo > hi)
            # an invalid pair of bounds acts as [0, 0]: the update is zeroed, never let through
            hi = jnp.where(invalid, jnp.zeros_like(hi), hi)
            lo = jnp.where(invalid, jnp.zeros_like(lo), lo)
        before, nonfinite = _n.global_norm_and_flag(updates, axis_name=axis_name,
                                                    partition_specs=partition_specs)
        maybe_raise_nonfinite(error_if_nonfinite, nonfinite, "clip_by_value")
        leaves = _n.float_leaves(updates)
        leaf_axes = _n.leaf_axes(updates, axis_name, partition_specs)
        clipped = _value_clamped(leaves, lo, hi, min_value is None, nonfinite)
        clipped = _n.any_across(clipped, _n.union_axes(leaf_axes))
        # The norm after the clamp reads the input again through its own expression (see
        # _clamp_for_norm), each leaf and the rescue's max with their own copies of the bounds:
        # a bound broadcast that XLA shares (with the clamp, or among leaves of one shape) is
        # written out in full on CPU (see norms.own_copies).
        los = _n.own_copies(lo, 2 * len(leaves))
        his = _n.own_copies(hi, 2 * len(leaves))

        def norm_after():
            if min_value is None:
                # Only taken when some element was clamped to hi, or on a non-finite step
                # (where an inf is clamped to hi here, and a NaN makes the norm NaN anyway):
                # divided by hi, every term is at most 1 and one is 1, so the sum can neither
                # overflow nor lose the small terms that matter, and needs no rescue (nor its
                # compile time).
                # d is held constant: the norm is homogeneous in it (d ||x / d|| = ||x||),
                # and its derivative, formed through 1/d**2, would under- or overflow.
                # A subnormal bound is taken as 0 on CPU: d = 1 then.
                d = lax.stop_gradient(jnp.where(
                    (hi >= jnp.finfo(hi.dtype).tiny) & jnp.isfinite(hi), hi, jnp.ones_like(hi)))
                # A bound that may differ across devices (an array or a schedule, inside
                # shard_map or pmap; a number cannot): d is the largest across the devices
                # whose sums are summed (the leaves' axes, over which the flag that chose
                # this branch is OR-ed too: a collective over any other axis could wait for
                # devices that took the other branch), so that they share one scale. Where
                # the bounds differ by more than about 1e19, or the largest is near
                # float32's max, the smaller bounds' clamped terms underflow and the scale
                # stat comes out too small (0 at worst); where one device's bound is inf (no
                # clamp there), d can be below its values, and the sum can overflow (scale
                # inf). The updates are clamped exactly either way.
                axes = _n.union_axes(leaf_axes)
                if axes and not is_python_number(max_value):
                    d = lax.pmax(d, axes)
                ds = _n.own_copies(d, len(leaves))
                return _n.norm_core(
                    leaves, 2.0, combine=True, axes_per_leaf=leaf_axes, rescue=False,
                    xform=lambda x, i, m: _clamp_for_norm(x, los[2 * i], his[2 * i], True)
                    / ds[i].astype(jnp.promote_types(x.dtype, jnp.float32)))[0][0] * d
            return _n.norm_core(
                leaves, 2.0, combine=True, axes_per_leaf=leaf_axes,
                xform=lambda x, i, m: _clamp_for_norm(x, los[2 * i + m], his[2 * i + m],
                                                      min_value is None, m))[0][0]

        # Nothing clamped on a finite step: the norm after is the norm before, and the
        # updates are not read a third time. Inside shard_map, bounds that differ across
        # devices may make the norm after differ across them too: both branches typed so.
        after_axes = vma_of(before).union(vma_of(lo), vma_of(hi))

        def typed(f):
            def g():
                v = f()
                return as_varying(v, vma_of(v), after_axes)
            return g

        after = lax.cond(clipped | nonfinite, typed(norm_after), typed(lambda: before))
        # The clamp does not need these reductions, and when the input is donated XLA then
        # copies the whole input to keep it for them. Bounds that depend on the reductions
        # (never changing their value: a norm is never < 0) order them before the clamp.
        order = (before < 0) & (after < 0) & clipped
        lo, hi = jnp.where(order, hi, lo), jnp.where(order, lo, hi)
        updates = jax.tree.map(lambda x: _clip_leaf(x, lo, hi), updates)
        ratio = jnp.where(before > 0, after / jnp.where(before > 0, before, 1), 1)
        stats = state.stats.advance(grad_norm=before, threshold=hi, scale=ratio,
                                    clipped=clipped, nonfinite=nonfinite,
                                    invalid_threshold=invalid)
        return updates, ValueClipState(count=increment(state.count), stats=stats)

    return transformation(_init_fn(ValueClipState), update_fn, raises=error_if_nonfinite)


def per_leaf_clip(
    updates: Any,
    leaf_threshold: Any,
    p: float,
    *,
    axis_name: AxisName = None,
    partition_specs: Any = None,
    layer_axis: Any = None,
) -> tuple[Any, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Shared body of the per-leaf clippers.

    ``leaf_threshold(norms, sizes)`` maps the vector of leaf p-norms (and the
    leaf sizes) to the leaves' thresholds, a scalar or a vector; each leaf is
    scaled by :func:`global_scale` of its own. With ``layer_axis``, a stacked
    leaf gives one entry per layer (see :mod:`optclip.layers`). Returns the scaled updates,
    the global norm, the ratio of norms after and before, whether any leaf (or
    layer) was scaled, and the non-finite flag.
    """
    flat, treedef = jax.tree_util.tree_flatten(updates)
    idx = [i for i, x in enumerate(flat) if _n.is_float_leaf(x)]
    xs = [jnp.asarray(flat[i]) for i in idx]
    las = _layers.resolve_layer_axes(layer_axis, updates)
    if not xs:
        z = jnp.zeros((), jnp.float32)
        return updates, z, jnp.ones((), jnp.float32), jnp.zeros((), bool), jnp.zeros((), bool)
    ln = _layers.layer_norms(xs, p, las, updates, axis_name=axis_name,
                             partition_specs=partition_specs)
    norms = ln.norms
    thresholds = leaf_threshold(norms, ln.sizes)
    # one factor per leaf (see clip_factors)
    scales = global_scale(norms, thresholds)
    out = list(flat)
    for i, s_i in zip(idx, ln.split(scales), strict=True):
        out[i] = scale_leaf(flat[i], s_i)
    before = _n.combine_norms(norms, p)
    after = _n.combine_norms(mul0(norms, scales), p)
    ratio = jnp.where(before > 0, after / jnp.where(before > 0, before, 1), 1)
    return (jax.tree_util.tree_unflatten(treedef, out), before, ratio, jnp.any(scales != 1),
            ln.nonfinite)


def clip_by_leaf_norm(
    max_norm: Threshold,
    *,
    ord: Ord = _n.L2,
    axis_name: AxisName = None,
    partition_specs: Any = None,
    layer_axis: LayerAxis = None,
    error_if_nonfinite: bool = False,
) -> optax.GradientTransformation:
    """Clips the p-norm of each leaf on its own to ``max_norm``.

    Each leaf ``g_i`` is scaled by ``min(1, max_norm / ||g_i||)``, like Keras's
    ``clipnorm`` and ``optax.clip_by_block_rms`` without the RMS. It changes
    the overall direction when leaves are clipped by different factors.

    Args:
      max_norm: the largest per-leaf norm: a float >= 0, a JAX scalar, or a
        schedule.
      ord: 1, 2 (default), ``math.inf`` or any real p >= 1.
      axis_name: inside ``shard_map``/``pmap``, the mesh axes along which
        *every* float leaf is sharded; each leaf's partial norm is combined
        across them. Replicated leaves must not be combined: clip them with a
        separate ``optax.masked`` instance without ``axis_name``.
      partition_specs: inside ``shard_map``, the ``PartitionSpec`` of every leaf
        (None for replicated ones), for trees of mixed layouts; see
        :func:`optclip.global_norm`. Wins over ``axis_name``.
      layer_axis: for scanned (stacked) layers, the axis along which a leaf
        stacks L layers: each slice along it is clipped on its own, as if the
        layers were separate leaves. An int (for every leaf of 2 or more
        dims), a pytree prefix of the updates with int or None leaves, or a
        callable ``(path, leaf) -> int | None``; see :mod:`optclip.layers`.
        With the layer axis split across devices inside ``shard_map``, name
        it in ``partition_specs`` (``axis_name`` means a split along the
        other dims). Under ``optax.inject_hyperparams``, pass it in
        ``static_args=("layer_axis",)``.
      error_if_nonfinite: raise on NaN or inf updates.

    Returns:
      An ``optax.GradientTransformation`` with a :class:`LeafNormClipState`.
      Its stats hold the global p-norm before, the ratio of global norms
      after and before, and whether any leaf (with ``layer_axis``: any
      layer) was clipped. The per-layer norms themselves are
      ``optclip.leaf_norms(updates, layer_axis=...)``.

    Raises:
      ValueError: for a negative or NaN ``max_norm``, an unknown ``ord``, or
        an invalid ``layer_axis``.

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> tx = optclip.clip_by_leaf_norm(1.0)
      >>> u, _ = tx.update({"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.1])}, tx.init(None))
      >>> u["a"], u["b"]
      (Array([0.6, 0.8], dtype=float32), Array([0.1], dtype=float32))
    """
    check_threshold("max_norm", max_norm)
    p = _n.check_ord(ord)
    _layers.check_layer_axis(layer_axis)

    def update_fn(updates, state, params=None):
        del params
        check_state(state, LeafNormClipState, "clip_by_leaf_norm")
        max_n, invalid = resolve_threshold(max_norm, state.count, name="max_norm")

        updates, before, ratio, clipped, nonfinite = per_leaf_clip(
            updates, lambda norms, sizes: max_n, p, axis_name=axis_name,
            partition_specs=partition_specs, layer_axis=layer_axis)
        maybe_raise_nonfinite(error_if_nonfinite, nonfinite, "clip_by_leaf_norm")
        stats = state.stats.advance(grad_norm=before, threshold=max_n, scale=ratio,
                                    clipped=clipped, nonfinite=nonfinite,
                                    invalid_threshold=invalid)
        return updates, LeafNormClipState(count=increment(state.count), stats=stats)

    return transformation(_init_fn(LeafNormClipState), update_fn, raises=error_if_nonfinite)


def clip_by_block_rms(
    threshold: Threshold,
    *,
    axis_name: AxisName = None,
    partition_specs: Any = None,
    layer_axis: LayerAxis = None,
    error_if_nonfinite: bool = False,
) -> optax.GradientTransformation:
    """Clips the root-mean-square of each leaf (block) to ``threshold``.

    Each leaf is scaled by ``min(1, threshold / rms(g_i))`` with
    ``rms(g_i) = ||g_i||_2 / sqrt(size_i)``, as ``optax.clip_by_block_rms``
    (from Shazeer & Stern, *Adafactor*, 2018, https://arxiv.org/abs/1804.04235,
    which clips the update's RMS), but overflow-safe and with stats.

    Args:
      threshold: the largest RMS per leaf: a float >= 0, a JAX scalar or a
        schedule.
      axis_name: as in :func:`clip_by_leaf_norm`: every float leaf is sharded
        along these axes, and both its norm and its size are combined.
      partition_specs: inside ``shard_map``, the ``PartitionSpec`` of every leaf
        (None for replicated ones), for trees of mixed layouts; see
        :func:`optclip.global_norm`. Wins over ``axis_name``.
      layer_axis: for scanned (stacked) layers, the axis along which a leaf
        stacks L layers: each layer's RMS (over its own size) is clipped on
        its own, as Levanter's scan-aware block-RMS clipping does. An int, a
        pytree prefix or a callable, as in :func:`clip_by_leaf_norm`.
      error_if_nonfinite: raise on NaN or inf updates.

    Returns:
      An ``optax.GradientTransformation`` with a :class:`BlockRMSClipState`.

    Raises:
      ValueError: for a negative or NaN ``threshold``, or an invalid
        ``layer_axis``.

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> tx = optclip.clip_by_block_rms(1.0)
      >>> u, _ = tx.update({"a": jnp.full((4,), 2.0)}, tx.init(None))
      >>> u["a"]
      Array([1., 1., 1., 1.], dtype=float32)
    """
    check_threshold("threshold", threshold)
    _layers.check_layer_axis(layer_axis)

    def update_fn(updates, state, params=None):
        del params
        check_state(state, BlockRMSClipState, "clip_by_block_rms")
        t, invalid = resolve_threshold(threshold, state.count, name="threshold")

        updates, before, ratio, clipped, nonfinite = per_leaf_clip(
            updates, lambda norms, sizes: t * jnp.sqrt(sizes), 2.0, axis_name=axis_name,
            partition_specs=partition_specs, layer_axis=layer_axis)
        maybe_raise_nonfinite(error_if_nonfinite, nonfinite, "clip_by_block_rms")
        stats = state.stats.advance(grad_norm=before, threshold=t, scale=ratio,
                                    clipped=clipped, nonfinite=nonfinite,
                                    invalid_threshold=invalid)
        return updates, BlockRMSClipState(count=increment(state.count), stats=stats)

    return transformation(_init_fn(BlockRMSClipState), update_fn, raises=error_if_nonfinite)
