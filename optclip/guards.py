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

from optclip import norms as _n
from optclip._common import f32
from optclip.norms import AxisName
from optclip.stats import GuardStats

__all__ = ["SkipNonfiniteState", "skip_nonfinite"]


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
    inner: optax.GradientTransformation, *, axis_name: AxisName = None
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
        norm, nonfinite = _n.global_norm_and_flag(updates, axis_name=axis_name)
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        out, inner_state = select_step(nonfinite, new_updates, new_inner, state.inner_state)
        count = state.stats.skip_count + nonfinite.astype(jnp.int32)
        stats = GuardStats(grad_norm=f32(norm), threshold=state.stats.threshold,
                           skipped=nonfinite, skip_count=count, nonfinite=nonfinite)
        return out, SkipNonfiniteState(inner_state=inner_state, stats=stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
