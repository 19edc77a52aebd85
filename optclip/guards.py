"""Guards: wrappers that skip a whole optimizer step.

A skipped step returns zero updates and leaves the inner optimizer's state
bit-identical, so that Adam's moments, schedules' counts and everything else
behave as if the step had never happened. The guard counts its skips.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optclip import adaptive as _a
from optclip import norms as _n
from optclip._common import check_threshold, f32
from optclip.norms import AxisName
from optclip.stats import GuardStats

__all__ = ["SkipNonfiniteState", "SkipOnSpikeState", "skip_nonfinite", "skip_on_spike"]


class SkipNonfiniteState(NamedTuple):
    """State of :func:`skip_nonfinite`.

    Attributes:
      inner_state: the wrapped optimizer's state, untouched on skipped steps.
      stats: the latest :class:`GuardStats` (with the running ``skip_count``).
    """

    inner_state: Any
    stats: GuardStats

    optclip_name = "skip_nonfinite"


def select_step(skip: jax.Array, new_updates: Any, new_inner: Any, old_inner: Any):
    """Zero updates and the old inner state where ``skip``, else the new ones."""
    updates = jax.tree.map(
        lambda u: jnp.where(skip, jnp.zeros_like(u), u) if _n.is_float_leaf(u) else u,
        new_updates,
    )
    inner = jax.tree.map(lambda new, old: jnp.where(skip, old, new), new_inner, old_inner)
    return updates, inner


def skip_nonfinite(
    inner: optax.GradientTransformation, *, axis_name: AxisName = None,
    partition_specs: Any = None,
) -> optax.GradientTransformation:
    """Skips every step whose gradients hold a NaN or an inf.

    Compared with ``optax.apply_if_finite``, the decision comes from the same
    overflow-safe global norm that optclip's stats report (so a large but
    finite fp16 gradient is not mistaken for an overflow), the skip count is
    in :func:`optclip.stats`, and there is no limit after which non-finite
    updates are let through.

    Args:
      inner: the optimizer to guard, e.g. ``optax.chain(clipper, adam)``.
      axis_name: inside ``shard_map``/``pmap``, the mesh axes across which the
        gradients are sharded, so that every shard takes the same decision.
      partition_specs: inside ``shard_map``, the ``PartitionSpec`` of every leaf
        (None for replicated ones), for trees of mixed layouts; see
        :func:`optclip.global_norm`. Wins over ``axis_name``.

    Returns:
      An ``optax.GradientTransformation`` with a :class:`SkipNonfiniteState`.

    Example:
      >>> import jax.numpy as jnp, optax, optclip
      >>> tx = optclip.skip_nonfinite(optax.adam(1e-3))
      >>> state = tx.init(jnp.zeros(2))
      >>> u, state = tx.update(jnp.array([1.0, jnp.nan]), state, jnp.zeros(2))
      >>> u, int(state.stats.skip_count)
      (Array([0., 0.], dtype=float32), 1)
    """

    def init_fn(params):
        return SkipNonfiniteState(inner_state=inner.init(params), stats=GuardStats.zeros())

    def update_fn(updates, state, params=None, **extra_args):
        norm, nonfinite = _n.global_norm_and_flag(updates, axis_name=axis_name,
            partition_specs=partition_specs)
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        out, inner_state = select_step(nonfinite, new_updates, new_inner, state.inner_state)
        stats = state.stats.advance(grad_norm=norm, threshold=state.stats.threshold,
                                    skipped=nonfinite, nonfinite=nonfinite)
        return out, SkipNonfiniteState(inner_state=inner_state, stats=stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class SkipOnSpikeState(NamedTuple):
    """State of :func:`skip_on_spike`.

    Attributes:
      inner_state: the wrapped optimizer's state, untouched on skipped steps.
      ema: the global norm's running statistics (see ``optclip.adaptive.EMAStats``).
      stats: the latest :class:`GuardStats` (with the running ``skip_count``).
    """

    inner_state: Any
    ema: Any
    stats: GuardStats

    optclip_name = "skip_on_spike"


def skip_on_spike(
    inner: optax.GradientTransformation,
    *,
    z_thresh: float = 4.0,
    alpha: float = 0.97,
    warmup_steps: int = 25,
    eps: float = 1e-6,
    axis_name: AxisName = None,
    partition_specs: Any = None,
) -> optax.GradientTransformation:
    """Skips a whole step when the global norm is a spike, or not finite.

    The global L2 norm's mean and variance are tracked as in
    :func:`optclip.zclip` (Welford over the first ``warmup_steps`` norms,
    then an EMA with decay ``alpha``). After warm-up, a step whose z-score
    ``(g - mean) / (std + eps)`` exceeds ``z_thresh`` is skipped: the updates
    are zeros and the inner state is bit-identical. A non-finite norm is
    always skipped. On a skipped spike the statistics record the threshold
    ``mean + z_thresh * (std + eps)`` rather than the spike, so that a
    lasting change of scale is absorbed after a few skips instead of
    stalling training, while a lone spike barely moves them.

    This is the "skip the batch" remedy of large-model training (for
    example PaLM, Chowdhery et al. 2022, restarted and skipped batches
    around spikes); unlike clipping, it drops the step's information.

    Args:
      inner: the optimizer to guard.
      z_thresh: the z-score above which a step is skipped (> 0).
      alpha: the EMA's decay, in [0, 1).
      warmup_steps: norms recorded before any step can be skipped (>= 1).
      eps: added to the standard deviation in the z-score.
      axis_name: mesh axes across which the gradients are sharded.
      partition_specs: inside ``shard_map``, the ``PartitionSpec`` of every leaf
        (None for replicated ones), for trees of mixed layouts; see
        :func:`optclip.global_norm`. Wins over ``axis_name``.

    Returns:
      An ``optax.GradientTransformation`` with a :class:`SkipOnSpikeState`.

    Raises:
      ValueError: for an alpha outside [0, 1), ``warmup_steps < 1`` or a
        non-positive ``z_thresh``.

    Example:
      >>> import jax.numpy as jnp, optax, optclip
      >>> tx = optclip.skip_on_spike(optax.sgd(1.0), warmup_steps=3)
      >>> state = tx.init(jnp.zeros(1))
      >>> for g in (1.0, 1.1, 0.9, 1.0, 100.0):
      ...     u, state = tx.update(jnp.array([g]), state, jnp.zeros(1))
      >>> u, int(state.stats.skip_count)
      (Array([0.], dtype=float32), 1)
    """
    _a._check_alpha("alpha", alpha)
    check_threshold("z_thresh", z_thresh)
    if isinstance(z_thresh, (int, float)) and z_thresh == 0:
        raise ValueError("z_thresh must be > 0; got 0.")
    _a._check_warmup(warmup_steps)
    check_threshold("eps", eps)

    def init_fn(params):
        return SkipOnSpikeState(inner_state=inner.init(params), ema=_a.EMAStats.zeros(),
                                stats=GuardStats.zeros())

    def update_fn(updates, state, params=None, **extra_args):
        norm, nonfinite = _n.global_norm_and_flag(updates, axis_name=axis_name,
            partition_specs=partition_specs)
        g = f32(norm)
        ema = state.ema
        zt = jnp.asarray(z_thresh, jnp.float32)
        warm = _a.ema_warm(ema, warmup_steps)
        std = jnp.sqrt(jnp.maximum(ema.var, 0.0))
        bound = ema.mean + zt * (std + eps)
        spike = warm & ((g - ema.mean) / (std + eps) > zt)
        skip = spike | ~jnp.isfinite(g)
        new_ema = _a.ema_record(ema, jnp.where(spike, bound, g), warmup_steps,
                                jnp.asarray(alpha, jnp.float32), jnp.isfinite(g))
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        out, inner_state = select_step(skip, new_updates, new_inner, state.inner_state)
        stats = state.stats.advance(grad_norm=g, threshold=jnp.where(warm, bound, jnp.inf),
                                    skipped=skip, nonfinite=nonfinite)
        return out, SkipOnSpikeState(inner_state=inner_state, ema=new_ema, stats=stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
