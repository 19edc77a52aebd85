"""Helpers shared by every clipper: thresholds, validation, scaling, errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optclip.norms import is_float_leaf

Threshold = float | jax.Array | Callable[[jax.Array], Any]
"""A Python float, a JAX scalar, or an Optax schedule (a callable of the step count)."""

_NUMBER = (int, float, np.integer, np.floating)


def is_python_number(x: Any) -> bool:
    return isinstance(x, _NUMBER) and not isinstance(x, bool)


def check_threshold(name: str, value: Any, *, allow_none: bool = False) -> None:
    """Validates a threshold at construction, when it is a Python number.

    JAX arrays (which may be tracers under ``inject_hyperparams``) and
    schedules are checked by nobody: their values are not known yet.
    """
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{name} must be a number >= 0, a JAX scalar or a schedule; got None.")
    if callable(value) or isinstance(value, (jax.Array, jax.core.Tracer)):
        return
    if isinstance(value, bool) or not is_python_number(value):
        raise ValueError(
            f"{name} must be a number >= 0, a JAX scalar or an optax schedule; "
            f"got {value!r} of type {type(value).__name__}."
        )
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be >= 0 (inf disables it); got {value!r}.")


def check_range(name: str, value: Any, lo: float, hi: float, *, hi_open: bool = True,
                lo_open: bool = False) -> None:
    """Raises ValueError unless a Python-number ``value`` lies in the interval."""
    if not is_python_number(value):
        return
    ok = not math.isnan(value)
    ok = ok and (value > lo if lo_open else value >= lo)
    ok = ok and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}; got {value!r}.")


def resolve(value: Threshold, count: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """The value of a threshold at step ``count``, as a scalar array."""
    if callable(value):
        value = value(count)
    return jnp.asarray(value, dtype)


def increment(count: jax.Array) -> jax.Array:
    """count + 1, saturating instead of wrapping around at int32's max."""
    return jnp.where(count < jnp.iinfo(jnp.int32).max, count + 1, count).astype(jnp.int32)


def scale_leaf(x: Any, scale: jax.Array) -> Any:
    """``x * scale`` in at least float32, returned in ``x``'s own dtype.

    Integer and ``float0`` leaves pass through untouched. The scale is a
    scalar or broadcasts against ``x``; multiplying (not dividing) keeps the
    result a single element-wise op that XLA fuses into the optimizer's pass.
    """
    if not is_float_leaf(x):
        return x
    x = jnp.asarray(x)
    if x.dtype.itemsize < 4 and not jnp.iscomplexobj(x):
        return (x.astype(jnp.float32) * scale.astype(jnp.float32)).astype(x.dtype)
    real = jnp.finfo(x.dtype).dtype
    return x * scale.astype(real)


def f32(x: Any) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _raise_nonfinite(flag: Any, where: str) -> None:
    if bool(np.asarray(flag)):
        raise FloatingPointError(
            f"optclip.{where}: the gradients contain NaN or inf (error_if_nonfinite=True). "
            "Find the first non-finite step with jax.debug_nans or by logging "
            "optclip.stats(state); wrap the optimizer in optclip.skip_nonfinite to skip such "
            "steps instead."
        )


def maybe_raise_nonfinite(enabled: bool, flag: jax.Array, where: str) -> None:
    """When ``enabled``, raises ``FloatingPointError`` on the host if ``flag`` is set.

    Uses ``jax.debug.callback``, so it works under ``jit``, ``scan`` and
    ``vmap``; under ``jit`` the error surfaces when the step's results are
    used, wrapped by the runtime (its message contains the text above). It
    costs a device-to-host copy of one bool per step: a debugging switch.
    """
    if enabled:
        jax.debug.callback(_raise_nonfinite, flag, where)
