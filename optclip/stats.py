"""What each clipper saw and did, and :func:`stats`, which finds it in any state.

Every optclip transformation keeps a small record in its state, written by
the same ``update`` that clipped, from the same norm: reading it costs no
second pass over the gradients and no host sync until you convert it.

Besides the latest step, every record keeps running counters (steps clipped,
non-finite steps, the peak norm), updated in the same pass, so that a logger
that reads the stats every N steps still sees a spike that happened between
two reads.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["ClipStats", "GuardStats", "SpikeStats", "reset_peaks", "stats", "stats_records"]


def _saturating_inc(count: jax.Array, by: jax.Array) -> jax.Array:
    """``count + by`` (by is a bool), saturating at int32's max instead of wrapping."""
    top = jnp.iinfo(jnp.int32).max
    return jnp.where(by & (count < top), count + 1, count).astype(jnp.int32)


def _f32(x: Any) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _flag(x: Any) -> jax.Array:
    return jnp.asarray(x).astype(bool)


def _computed(cls: type, fields: dict[str, jax.Array], prev: Any, counter: jax.Array) -> Any:
    """``cls(**fields)``, with no field a compile-time constant of the compiled step.

    Some fields are known at compile time: the threshold and ``invalid_threshold`` of a
    clipper given a float, the loss fields of a guard that watches no loss. XLA would make
    them constant outputs of the step, and on a GPU those cost far more than their size:
    two constant scalars in the state of a transformation chained before adam made adam's
    step 1.23-1.46x slower on GPT-2 and 1.27-1.29x on ResNet-50 on an H200 (``python -m
    bench.gn_probe``, ``adam_constout``, jax 0.11.2), and with them the global-norm chain
    ran at 1.6x the hand-fused clip, 1.1x without (``bench/results/h200_2f30d35/``). So
    every field is selected against the incoming record's on ``counter >= 0``: always true
    (the counters start at 0 and saturate), but not known to XLA. One scalar select per
    field.
    """
    live = counter >= 0
    return cls(**{k: jnp.where(live, v, getattr(prev, k)) for k, v in fields.items()})


class ClipStats(NamedTuple):
    """One clipper's record: its latest step and running counters. Every field is a scalar.

    Attributes:
      grad_norm: float32, the pre-clip global norm of the incoming updates:
        the very value that decided the clip for global clippers. For
        per-leaf and per-unit clippers, the global norm of the same order as
        the per-leaf norms (the global p-norm for ``clip_by_leaf_norm``, L2
        for the others), a diagnostic.
      threshold: float32, the threshold in force at this step (after any
        schedule, or as computed by an adaptive clipper).
      scale: float32, the norm of the outgoing updates divided by the norm of
        the incoming ones: 1 when nothing changed, the clip factor itself for
        global-norm clipping.
      clipped: bool, whether this step changed the updates.
      nonfinite: bool, whether any incoming element was NaN or infinite.
        ``grad_norm`` is then NaN or inf as well.
      invalid_threshold: bool, whether a threshold given at run time (by a
        schedule or a traced array) was negative or NaN at this step. Such a
        threshold acts as 0: the updates are zeroed, never sign-flipped and
        never let through unclipped.
      clip_count: int32, the number of steps clipped since ``init``.
      nonfinite_count: int32, the number of steps with NaN or inf updates.
      peak_grad_norm: float32, the largest ``grad_norm`` since ``init`` or
        the last :func:`reset_peaks` (inf counts, NaN does not).
    """

    grad_norm: jax.Array
    threshold: jax.Array
    scale: jax.Array
    clipped: jax.Array
    nonfinite: jax.Array
    invalid_threshold: jax.Array
    clip_count: jax.Array
    nonfinite_count: jax.Array
    peak_grad_norm: jax.Array

    @classmethod
    def zeros(cls) -> ClipStats:
        """A fresh record. Every field is its own buffer, so a fresh state can be donated."""
        return cls(
            grad_norm=jnp.zeros((), jnp.float32),
            threshold=jnp.zeros((), jnp.float32),
            scale=jnp.ones((), jnp.float32),
            clipped=jnp.zeros((), bool),
            nonfinite=jnp.zeros((), bool),
            invalid_threshold=jnp.zeros((), bool),
            clip_count=jnp.zeros((), jnp.int32),
            nonfinite_count=jnp.zeros((), jnp.int32),
            peak_grad_norm=jnp.zeros((), jnp.float32),
        )

    def advance(
        self,
        *,
        grad_norm: Any,
        threshold: Any,
        scale: Any,
        clipped: Any,
        nonfinite: Any,
        invalid_threshold: Any = False,
    ) -> ClipStats:
        """The record of the next step: the latest values, and the counters carried on."""
        grad_norm = _f32(grad_norm)
        clipped = _flag(clipped)
        nonfinite = _flag(nonfinite)
        return _computed(ClipStats, dict(
            grad_norm=grad_norm,
            threshold=_f32(threshold),
            scale=_f32(scale),
            clipped=clipped,
            nonfinite=nonfinite,
            invalid_threshold=_flag(invalid_threshold),
            clip_count=_saturating_inc(self.clip_count, clipped),
            nonfinite_count=_saturating_inc(self.nonfinite_count, nonfinite),
            peak_grad_norm=jnp.fmax(self.peak_grad_norm, grad_norm),
        ), self, self.clip_count)


def _guard_fields(prev: Any, grad_norm: Any, threshold: Any, skipped: Any,
                  nonfinite: Any) -> dict[str, jax.Array]:
    """The fields every guard's record shares, advanced from ``prev``."""
    grad_norm = _f32(grad_norm)
    skipped = _flag(skipped)
    nonfinite = _flag(nonfinite)
    return {
        "grad_norm": grad_norm,
        "threshold": _f32(threshold),
        "skipped": skipped,
        "skip_count": _saturating_inc(prev.skip_count, skipped),
        "nonfinite": nonfinite,
        "nonfinite_count": _saturating_inc(prev.nonfinite_count, nonfinite),
        "peak_grad_norm": jnp.fmax(prev.peak_grad_norm, grad_norm),
    }


class GuardStats(NamedTuple):
    """The record of :func:`optclip.skip_nonfinite` (:class:`SpikeStats` extends it).

    Attributes:
      grad_norm: float32, the global L2 norm the guard looked at.
      threshold: float32, the norm above which it skips (inf when it skips
        only non-finite steps).
      skipped: bool, whether this step was skipped.
      skip_count: int32, how many steps were skipped so far.
      nonfinite: bool, whether any incoming element was NaN or infinite.
      nonfinite_count: int32, the number of steps with NaN or inf updates.
      peak_grad_norm: float32, the largest ``grad_norm`` since ``init`` or the
        last :func:`reset_peaks` (inf counts, NaN does not).
    """

    grad_norm: jax.Array
    threshold: jax.Array
    skipped: jax.Array
    skip_count: jax.Array
    nonfinite: jax.Array
    nonfinite_count: jax.Array
    peak_grad_norm: jax.Array

    @classmethod
    def zeros(cls, threshold: float = float("inf")) -> GuardStats:
        """A fresh record, every field its own buffer."""
        return cls(
            grad_norm=jnp.zeros((), jnp.float32),
            threshold=jnp.full((), threshold, jnp.float32),
            skipped=jnp.zeros((), bool),
            skip_count=jnp.zeros((), jnp.int32),
            nonfinite=jnp.zeros((), bool),
            nonfinite_count=jnp.zeros((), jnp.int32),
            peak_grad_norm=jnp.zeros((), jnp.float32),
        )

    def advance(self, *, grad_norm: Any, threshold: Any, skipped: Any,
                nonfinite: Any) -> GuardStats:
        """The record of the next step: the latest values, and the counters carried on."""
        return _computed(GuardStats, _guard_fields(self, grad_norm, threshold, skipped,
                                                   nonfinite), self, self.skip_count)


class SpikeStats(NamedTuple):
    """The record of :func:`optclip.skip_on_spike`: :class:`GuardStats`'s fields, then the
    statistics the spike rule compared against. Every field is a scalar.

    Attributes:
      grad_norm: float32, the global L2 norm of the incoming updates.
      threshold: float32, the grad norm above which this step would have been a spike
        (``mean + z_thresh * (std + eps)``); inf while the statistics are not ready, or
        when only the loss is watched.
      skipped: bool, whether this step was skipped.
      skip_count: int32, how many steps were skipped so far.
      nonfinite: bool, whether any incoming element (or, when the loss is watched, the
        loss) was NaN or infinite.
      nonfinite_count: int32, the number of such steps.
      peak_grad_norm: float32, the largest ``grad_norm`` since ``init`` or the last
        :func:`reset_peaks` (inf counts, NaN does not).
      grad_norm_mean: float32, the mean of the grad-norm statistics the step was
        compared against (the window's mean, or the EMA's); 0 when not watched.
      grad_norm_std: float32, their standard deviation; 0 when not watched.
      loss: float32, the ``value=`` passed to ``update``; 0 when none was passed.
      loss_threshold: float32, the loss above which this step would have been a spike;
        inf while not ready or not watched.
      loss_mean: float32, the mean of the loss statistics; 0 when not watched.
      loss_std: float32, their standard deviation; 0 when not watched.
      spike_grad_norm: bool, whether the grad norm was a spike at this step.
      spike_loss: bool, whether the loss was a spike at this step.
      forced: bool, whether this spike was taken anyway, after ``max_consecutive``
        skips in a row.
      forced_count: int32, how many spikes were taken that way.
    """

    grad_norm: jax.Array
    threshold: jax.Array
    skipped: jax.Array
    skip_count: jax.Array
    nonfinite: jax.Array
    nonfinite_count: jax.Array
    peak_grad_norm: jax.Array
    grad_norm_mean: jax.Array
    grad_norm_std: jax.Array
    loss: jax.Array
    loss_threshold: jax.Array
    loss_mean: jax.Array
    loss_std: jax.Array
    spike_grad_norm: jax.Array
    spike_loss: jax.Array
    forced: jax.Array
    forced_count: jax.Array

    @classmethod
    def zeros(cls) -> SpikeStats:
        """A fresh record, every field its own buffer."""
        return cls(
            grad_norm=jnp.zeros((), jnp.float32),
            threshold=jnp.full((), jnp.inf, jnp.float32),
            skipped=jnp.zeros((), bool),
            skip_count=jnp.zeros((), jnp.int32),
            nonfinite=jnp.zeros((), bool),
            nonfinite_count=jnp.zeros((), jnp.int32),
            peak_grad_norm=jnp.zeros((), jnp.float32),
            grad_norm_mean=jnp.zeros((), jnp.float32),
            grad_norm_std=jnp.zeros((), jnp.float32),
            loss=jnp.zeros((), jnp.float32),
            loss_threshold=jnp.full((), jnp.inf, jnp.float32),
            loss_mean=jnp.zeros((), jnp.float32),
            loss_std=jnp.zeros((), jnp.float32),
            spike_grad_norm=jnp.zeros((), bool),
            spike_loss=jnp.zeros((), bool),
            forced=jnp.zeros((), bool),
            forced_count=jnp.zeros((), jnp.int32),
        )

    def advance(self, *, grad_norm: Any, threshold: Any, skipped: Any, nonfinite: Any,
                grad_norm_mean: Any, grad_norm_std: Any, loss: Any, loss_threshold: Any,
                loss_mean: Any, loss_std: Any, spike_grad_norm: Any, spike_loss: Any,
                forced: Any) -> SpikeStats:
        """The record of the next step: the latest values, and the counters carried on."""
        forced = _flag(forced)
        return _computed(SpikeStats, dict(
            **_guard_fields(self, grad_norm, threshold, skipped, nonfinite),
            grad_norm_mean=_f32(grad_norm_mean),
            grad_norm_std=_f32(grad_norm_std),
            loss=_f32(loss),
            loss_threshold=_f32(loss_threshold),
            loss_mean=_f32(loss_mean),
            loss_std=_f32(loss_std),
            spike_grad_norm=_flag(spike_grad_norm),
            spike_loss=_flag(spike_loss),
            forced=forced,
            forced_count=_saturating_inc(self.forced_count, forced),
        ), self, self.skip_count)


def _is_record_holder(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "optclip_name") and hasattr(x, "stats")


def _is_nnx_variable(v: Any) -> bool:
    return not isinstance(v, (jax.Array, jax.core.Tracer)) and hasattr(v, "get_value")


def _unwrap(v: Any) -> Any:
    # Flax nnx keeps optimizer state in Variables (``OptArray``); read them with the current
    # API, ``get_value()`` (``.value`` is deprecated).
    return v.get_value() if _is_nnx_variable(v) else v


def _walk(opt_state: Any) -> list[tuple[str, Any, Any]]:
    """``(name, record, stale)`` for every record, outermost first. ``stale`` is a bool
    scalar, True when an enclosing guard skipped the latest step (the record then shows the
    last step that was taken), or None when no guard encloses it."""
    found: list[tuple[str, Any, Any]] = []

    def walk(node: Any, stale: Any) -> None:
        leaves = jax.tree_util.tree_leaves(
            node, is_leaf=lambda x: _is_record_holder(x) or _is_nnx_variable(x))
        for holder in leaves:
            if _is_nnx_variable(holder):
                walk(holder.get_value(), stale)
                continue
            if not _is_record_holder(holder):
                continue
            rec = type(holder.stats)(*[_unwrap(v) for v in holder.stats])
            found.append((type(holder).optclip_name, rec, stale))
            inner_stale = stale
            if hasattr(rec, "skipped"):
                inner_stale = rec.skipped if stale is None else (stale | rec.skipped)
            for name in holder._fields:
                if name != "stats":
                    walk(getattr(holder, name), inner_stale)

    walk(opt_state, None)
    return found


def stats_records(opt_state: Any) -> list[tuple[str, Any]]:
    """Every optclip record in ``opt_state``, outermost first, with its clipper's name.

    The walk goes through any pytree: ``optax.chain``, ``inject_hyperparams``,
    ``MultiSteps``, ``masked``, ``multi_transform``, optclip's own guards and
    Flax ``nnx.Optimizer.opt_state``.
    """
    return [(name, rec) for name, rec, _ in _walk(opt_state)]


def _looks_like_optimizer_state(x: Any) -> bool:
    """True for anything that could hold an optimizer state: any pytree with a leaf, or an
    Optax state object (``EmptyState``, a tuple of them)."""
    if jax.tree_util.tree_leaves(x):
        return True
    return isinstance(x, tuple)


def stats(opt_state: Any, *, prefix: bool = False, host: bool = False) -> dict[str, Any]:
    """A flat dict of the latest stats of every optclip clipper in ``opt_state``.

    The keys of one clipper are the fields of its record (:class:`ClipStats`:
    ``grad_norm``, ``threshold``, ``scale``, ``clipped``, ``nonfinite``,
    ``invalid_threshold``, ``clip_count``, ``nonfinite_count``,
    ``peak_grad_norm``; a guard's :class:`GuardStats`: ``grad_norm``,
    ``threshold``, ``skipped``, ``skip_count``, ...). A record inside a guard
    also has ``stale``: True when the guard skipped the latest step, so that
    the record (kept bit-identical by the skip) shows the last step taken.

    With a single record and ``prefix=False`` the keys are bare. With several,
    or with ``prefix=True``, each key is prefixed by the clipper's name,
    ``"clip_by_global_norm/grad_norm"``, and by its position among clippers of
    the same name when that repeats (``"clip_by_value_0/..."``). Use
    ``prefix=True`` in logging code: its keys do not change when the optimizer
    is later wrapped in a guard.

    The values are the arrays held in the state: converting them to Python
    numbers is the only sync, and can be done every N steps; the counters and
    ``peak_grad_norm`` (see :func:`reset_peaks`) cover the steps in between.

    Args:
      opt_state: any optimizer state (see :func:`stats_records`).
      prefix: always prefix the keys by the clipper's name.
      host: return plain Python ``float``, ``int`` and ``bool`` values,
        fetched in one transfer (ready for ``json.dumps`` and loggers).
        Not inside ``jit``.

    Returns:
      ``{key: value}``; empty when the state holds no optclip clipper.

    Raises:
      TypeError: when ``opt_state`` is not an optimizer state at all (a
        function, a transformation, a number, ``None``).

    Warns:
      UserWarning: when ``opt_state`` is a pytree that holds no optclip
        record (say, the state of a plain ``optax.adam``), so that a logger
        that silently logs nothing is noticed.

    Example:
      >>> import jax.numpy as jnp, optax, optclip
      >>> tx = optax.chain(optclip.clip_by_global_norm(1.0), optax.sgd(0.1))
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
      >>> s = optclip.stats(state, host=True)
      >>> s["grad_norm"], s["scale"], s["clipped"], s["clip_count"]
      (5.0, 0.2, True, 1)
    """
    is_tx = hasattr(opt_state, "init") and hasattr(opt_state, "update")
    if (opt_state is None or callable(opt_state) or is_tx
            or isinstance(opt_state, (int, float, str))):
        raise TypeError(
            "optclip.stats reads an optimizer *state* (what tx.init / tx.update return, or "
            f"nnx.Optimizer.opt_state); got {type(opt_state).__name__}."
        )
    found = _walk(opt_state)
    if not found:
        warnings.warn(
            "optclip.stats found no optclip clipper in this optimizer state (is the clipper "
            "in the chain, and is this the state tx.update returned?); returning {}.",
            stacklevel=2,
        )
        return {}
    names = [n for n, _, _ in found]
    out: dict[str, Any] = {}
    seen: dict[str, int] = {}
    for name, rec, stale in found:
        if len(found) == 1 and not prefix:
            pre = ""
        elif names.count(name) > 1:
            i = seen.get(name, 0)
            seen[name] = i + 1
            pre = f"{name}_{i}/"
        else:
            pre = f"{name}/"
        for k in rec._fields:
            out[pre + k] = getattr(rec, k)
        if stale is not None:
            out[pre + "stale"] = stale
    if host:
        out = {k: v.item() for k, v in jax.device_get(out).items()}
    return out


def reset_peaks(opt_state: Any) -> Any:
    """The same state with every record's ``peak_grad_norm`` set back to 0.

    Call it after each log to read the peak per logging window::

        if step % 100 == 0:
            log(optclip.stats(state, host=True))
            state = optclip.reset_peaks(state)

    Works on any state :func:`stats` reads (not on nnx Variables: reset
    ``optimizer.opt_state`` by assigning the result). Every other field is
    returned as it was; the reset peaks are new buffers, so the state can
    still be donated.
    """

    def fix(x: Any) -> Any:
        if not _is_record_holder(x):
            return x
        fields = {}
        for name in x._fields:
            v = getattr(x, name)
            if name == "stats" and hasattr(v, "peak_grad_norm"):
                v = v._replace(peak_grad_norm=jnp.zeros((), jnp.float32))
            else:
                v = reset_peaks(v)
            fields[name] = v
        return type(x)(**fields)

    return jax.tree_util.tree_map(fix, opt_state, is_leaf=_is_record_holder)
