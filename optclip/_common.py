"""Helpers shared by every clipper: thresholds, validation, scaling, errors."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optclip.norms import compiles_eagerly, is_float_leaf

Threshold = float | jax.Array | Callable[[jax.Array], Any]
"""A Python float, a JAX scalar, or an Optax schedule (a callable of the step count)."""

_NUMBER = (int, float, np.integer, np.floating)


def is_python_number(x: Any) -> bool:
    return isinstance(x, _NUMBER) and not isinstance(x, bool)


def concrete_scalar(name: str, value: Any) -> float | None:
    """The Python value of a concrete scalar threshold (a number or a concrete JAX or NumPy
    scalar); None for a schedule or a traced array, whose value is not known yet.

    Raises:
      ValueError: when ``value`` is an array that is not a scalar.
    """
    if callable(value) or isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, (jax.Array, np.ndarray)):
        if np.shape(value) != ():
            raise ValueError(
                f"{name} must be a scalar (a number, a 0-d array or a schedule); got an array "
                f"of shape {np.shape(value)}."
            )
        if not jnp.issubdtype(value.dtype, jnp.number) or jnp.issubdtype(
                value.dtype, jnp.complexfloating):
            raise ValueError(f"{name} must be a real number; got dtype {value.dtype}.")
        return float(value)
    if is_python_number(value):
        return float(value)
    return None


def check_threshold(name: str, value: Any, *, allow_none: bool = False) -> None:
    """Validates a threshold at construction, whenever its value is concrete.

    Python numbers and concrete JAX or NumPy scalars are checked here: a
    negative or NaN value raises. Schedules and traced arrays (under
    ``inject_hyperparams`` inside ``jit``) are checked at run time by
    :func:`resolve_threshold`, which makes an invalid value act as 0 and
    flags it in the stats.
    """
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{name} must be a number >= 0, a JAX scalar or a schedule; got None.")
    if isinstance(value, bool) or not (callable(value) or is_python_number(value)
                                       or isinstance(value, (jax.Array, np.ndarray))):
        raise ValueError(
            f"{name} must be a number >= 0, a JAX scalar or an optax schedule; "
            f"got {value!r} of type {type(value).__name__}."
        )
    v = concrete_scalar(name, value)
    if v is not None and (math.isnan(v) or v < 0):
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


def resolve(value: Threshold, count: jax.Array, dtype: Any = jnp.float32,
            name: str = "threshold") -> jax.Array:
    """The value of a threshold at step ``count``, as a scalar array.

    Raises:
      ValueError: when the value (or what a schedule returns) is not a scalar.
    """
    what = name
    if callable(value):
        value = value(count)
        what = f"the schedule given as {name}"
    shape = jnp.shape(value)
    if shape != ():
        raise ValueError(f"{what} must give a scalar; got shape {shape}.")
    return jnp.asarray(value, dtype)


def resolve_threshold(value: Threshold, count: jax.Array, dtype: Any = jnp.float32,
                      name: str = "threshold") -> tuple[jax.Array, jax.Array]:
    """``(threshold, invalid)`` at step ``count``: a negative or NaN value acts as 0.

    A threshold that a schedule or a traced array makes negative would flip
    the sign of the update (gradient ascent), and a NaN one would switch
    clipping off; both act as 0 instead (the update is zeroed), and
    ``invalid`` is True so that the stats flag it.
    """
    t = resolve(value, count, dtype, name)
    invalid = jnp.isnan(t) | (t < 0)
    # max(t, 0) rather than a select on ``invalid``: XLA may recompute t in several fusions,
    # and a comparison in one need not agree with a value in another at t = -1e-8 (FMA)
    return jnp.where(jnp.isnan(t), jnp.zeros_like(t), jnp.maximum(t, 0)), invalid


def increment(count: jax.Array) -> jax.Array:
    """count + 1, saturating instead of wrapping around at int32's max."""
    return jnp.where(count < jnp.iinfo(jnp.int32).max, count + 1, count).astype(jnp.int32)


def scale_leaf(x: Any, a: jax.Array, b: jax.Array | None = None) -> Any:
    """``x * a`` (``x * a * b`` with ``b``) in at least float32, returned in ``x``'s own
    dtype.

    ``(a, b)`` may be a clip factor as a pair (:func:`optclip.static.clip_factors`):
    a factor too small for a normal float32 number is applied as two. They are
    scalars or broadcast against ``x``. Integer and ``float0`` leaves pass
    through untouched. Multiplying (not dividing) keeps the result element-wise
    ops that XLA fuses into the optimizer's pass.
    """
    if not is_float_leaf(x):
        return x
    x = jnp.asarray(x)
    low = x.dtype.itemsize < 4 and not jnp.iscomplexobj(x)
    wide = jnp.float32 if low else jnp.finfo(x.dtype).dtype
    y = x.astype(jnp.float32) if low else x
    y = y * a.astype(wide)
    if b is not None:
        y = y * b.astype(wide)
    return y.astype(x.dtype)


def mul0(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a * b`` with ``0 * inf = 0``: an infinite fraction of a zero weight is still 0, and
    a norm beyond float32's range (inf) scaled by 0 is 0, not NaN."""
    return jnp.where((a == 0) | (b == 0), jnp.zeros_like(a), a * b)


def scale_tree(tree: Any, factors: jax.Array) -> Any:
    """Every leaf of ``tree`` scaled by one clip factor, given as a stacked pair.

    Each of the two scalars is taken out of the pair by a sum under a constant
    mask, a reduction: XLA does not fuse a reduction into the kernels that use
    it, and would otherwise copy the ops that form the scalars into every
    leaf's kernel (three selects and two compares more per leaf, and compile
    time that grows with them; an optimization barrier is removed before
    fusion, and does not stop it). A sum of one value and zeros is that value.
    """
    which = np.arange(2)
    a, b = (jnp.sum(jnp.where(which == i, factors, jnp.zeros((), factors.dtype)))
            for i in range(2))
    return jax.tree.map(lambda x: scale_leaf(x, a, b), tree)


def check_state(state: Any, state_cls: type, name: str) -> None:
    """A ``TypeError`` that names ``state`` when ``update`` is given no state, or the state of
    another transformation."""
    if isinstance(state, state_cls):
        return
    if state is None:
        raise TypeError(
            f"optclip.{name}: update got state=None. Pass the state that tx.init(params) "
            "returned, then the one each tx.update returns: updates, state = "
            "tx.update(grads, state, params)."
        )
    other = getattr(type(state), "optclip_name", None)
    what = f"the state of optclip.{other}" if other else f"a {type(state).__name__}"
    raise TypeError(
        f"optclip.{name}: update got {what} as its state; pass the state that this "
        f"transformation's own init returned (a {state_cls.__name__}). Is it the state of "
        "another optimizer, or one built before the optimizer was wrapped?"
    )


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


# What a compiled call raises while it runs (rather than while it is traced)
_RUNTIME_ERROR = getattr(jax.errors, "JaxRuntimeError", RuntimeError)


def _floating_point_error(err: Exception) -> FloatingPointError:
    """The ``FloatingPointError`` that ``maybe_raise_nonfinite``'s callback raised inside a
    compiled call, out of the runtime error that wraps it."""
    text = str(err)
    start = text.rfind("FloatingPointError: ")
    line = text[start + len("FloatingPointError: "):].split("\n", 1)[0] if start >= 0 else text
    return FloatingPointError(line)


def transformation(init_fn: Callable, update_fn: Callable, *, raises: bool = False,
                   extra_args: bool = False) -> optax.GradientTransformation:
    """An Optax transformation whose ``update``, called again and again outside any JAX
    transformation, runs compiled: one program, built at its second call and reused.

    Called eagerly, an update runs op by op, and JAX traces every ``lax.cond`` in it again
    at every call, as new programs, and compiles each again: 150-460 ms a step on a small
    tree on XLA:CPU, where the compiled update takes 0.2-0.4 ms (``python -m
    bench.eager_probe``). The first call of a transformation still runs op by op: one built
    anew at every step (as ``optax.inject_hyperparams`` builds it) is called once, and
    compiling it would cost a compile at every step. Runs as written: under ``jit``,
    ``grad``, ``vmap``, ``shard_map`` or ``pmap`` (the arguments are tracers), under
    ``jax.disable_jit()``, when an argument is not a JAX array (a NumPy array, a Python
    number or string, a ``float0`` array), and from the first time tracing it needs a
    Python value, or otherwise fails to trace where it ran op by op (a schedule with a
    Python ``if`` on the step count, or one that formats it): then with a ``RuntimeWarning``,
    once. As under ``jit``, what the update reads from Python while it is traced (a schedule's
    or a wrapped optimizer's Python state) is fixed at the second call.

    With ``raises`` (``error_if_nonfinite=True``), the compiled call is waited for, and the
    ``FloatingPointError`` of a non-finite step is raised as such, as an eager call raises
    it (under the caller's ``jit`` it arrives wrapped by the runtime instead).
    """
    compiled = jax.jit(update_fn)
    calls = {"n": 0, "as_written": False}

    @functools.wraps(update_fn)
    def run(updates, state, params=None, **extra):
        args = (updates, state, params, extra)
        if calls["as_written"] or not compiles_eagerly(args):
            return update_fn(updates, state, params, **extra)
        calls["n"] += 1
        if calls["n"] == 1:
            return update_fn(updates, state, params, **extra)
        try:
            out = compiled(updates, state, params, **extra)
            return jax.block_until_ready(out) if raises else out
        except _RUNTIME_ERROR as err:
            if not raises or "FloatingPointError" not in str(err):
                raise
            raise _floating_point_error(err) from err
        except Exception as err:
            # Raised while tracing. An error of the caller's (a wrong state, a tree of other
            # shapes) is raised again, op by op; an update that ran op by op but cannot be
            # traced runs op by op from now on.
            out = update_fn(updates, state, params, **extra)
            calls["as_written"] = True
            warnings.warn(
                f"optclip: this update ran op by op but could not be compiled "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                "it runs op by op from now on, tracing its lax.conds at every call.",
                RuntimeWarning, stacklevel=2)
            return out

    if extra_args:
        return optax.GradientTransformationExtraArgs(init_fn, run)
    return optax.GradientTransformation(init_fn, run)


def vma(aval: Any) -> frozenset:
    """The mesh axes an abstract value varies over inside ``shard_map`` (none outside it,
    and on JAX versions that do not type them)."""
    mat = getattr(aval, "mat", None)  # JAX >= 0.10: the manual axis type
    if mat is not None:
        return frozenset(getattr(mat, "varying", None) or ())
    return frozenset(getattr(aval, "vma", None) or ())  # JAX 0.6 - 0.9


def vma_of(x: Any) -> frozenset:
    return vma(jax.typeof(x)) if hasattr(jax, "typeof") else frozenset()


def as_varying(x: jax.Array, have: frozenset, want: frozenset) -> jax.Array:
    """``x`` typed as varying over ``want`` (a superset of ``have``); values unchanged."""
    extra = tuple(sorted(want - have, key=str))
    if not extra:
        return x
    if hasattr(lax, "pcast"):
        return lax.pcast(x, extra, to="varying")
    return lax.pvary(x, extra)  # JAX 0.6 - 0.9
