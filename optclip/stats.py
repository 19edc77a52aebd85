"""What each clipper saw and did, and :func:`stats`, which finds it in any state.

Every optclip transformation keeps a small record in its state, written by
the same ``update`` that clipped, from the same norm: reading it costs no
second pass over the gradients and no host sync until you convert it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["ClipStats", "GuardStats", "stats", "stats_records"]

CLIP_KEYS = ("grad_norm", "threshold", "scale", "clipped")
GUARD_KEYS = ("grad_norm", "threshold", "skipped", "skip_count")


class ClipStats(NamedTuple):
    """The latest step of one clipper. Every field is a scalar.

    Attributes:
      grad_norm: float32, the pre-clip global norm of the incoming updates:
        the very value that decided the clip for global clippers. For
        per-leaf and per-unit clippers, the global L2 norm (diagnostic).
      threshold: float32, the threshold in force at this step (after any
        schedule, or as computed by an adaptive clipper).
      scale: float32, the norm of the outgoing updates divided by the norm of
        the incoming ones: 1 when nothing changed, the clip factor itself for
        global-norm clipping.
      clipped: bool, whether this step changed the updates.
      nonfinite: bool, whether any incoming element was NaN or infinite.
        ``grad_norm`` is then NaN or inf as well.
    """

    grad_norm: jax.Array
    threshold: jax.Array
    scale: jax.Array
    clipped: jax.Array
    nonfinite: jax.Array

    @classmethod
    def zeros(cls) -> ClipStats:
        f = jnp.zeros((), jnp.float32)
        b = jnp.zeros((), bool)
        return cls(grad_norm=f, threshold=f, scale=jnp.ones((), jnp.float32), clipped=b,
                   nonfinite=b)


class GuardStats(NamedTuple):
    """The latest step of a guard (:func:`optclip.skip_nonfinite`, ...).

    Attributes:
      grad_norm: float32, the global L2 norm the guard looked at.
      threshold: float32, the norm above which it skips (inf when it skips
        only non-finite steps).
      skipped: bool, whether this step was skipped.
      skip_count: int32, how many steps were skipped so far.
      nonfinite: bool, whether any incoming element was NaN or infinite.
    """

    grad_norm: jax.Array
    threshold: jax.Array
    skipped: jax.Array
    skip_count: jax.Array
    nonfinite: jax.Array

    @classmethod
    def zeros(cls, threshold: float = float("inf")) -> GuardStats:
        b = jnp.zeros((), bool)
        return cls(grad_norm=jnp.zeros((), jnp.float32),
                   threshold=jnp.full((), threshold, jnp.float32), skipped=b,
                   skip_count=jnp.zeros((), jnp.int32), nonfinite=b)


def _is_record_holder(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "optclip_name") and hasattr(x, "stats")


def _unwrap(v: Any) -> Any:
    # Flax nnx keeps optimizer state in Variables (``OptArray``) that hold ``.value``.
    if not isinstance(v, (jax.Array, jax.core.Tracer)) and hasattr(v, "value"):
        return v.value
    return v


def stats_records(opt_state: Any) -> list[tuple[str, ClipStats | GuardStats]]:
    """Every optclip record in ``opt_state``, outermost first, with its clipper's name.

    The walk goes through any pytree: ``optax.chain``, ``inject_hyperparams``,
    ``MultiSteps``, ``masked``, ``multi_transform``, optclip's own guards and
    Flax ``nnx.Optimizer.opt_state``.
    """
    found: list[tuple[str, Any]] = []

    def walk(node: Any) -> None:
        for holder in jax.tree_util.tree_leaves(node, is_leaf=_is_record_holder):
            if not _is_record_holder(holder):
                continue
            rec = holder.stats
            rec = type(rec)(*[_unwrap(v) for v in rec])
            found.append((type(holder).optclip_name, rec))
            for name in holder._fields:
                if name != "stats":
                    walk(getattr(holder, name))

    walk(opt_state)
    return found


def stats(opt_state: Any) -> dict[str, jax.Array]:
    """A flat dict of the latest stats of every optclip clipper in ``opt_state``.

    With a single clipper the keys are exactly ``grad_norm``, ``threshold``,
    ``scale`` and ``clipped`` (a guard alone gives ``grad_norm``,
    ``threshold``, ``skipped`` and ``skip_count``). With several, each key is
    prefixed by the clipper's name, ``"clip_by_global_norm/grad_norm"``, and
    by its position among clippers of the same name when that repeats
    (``"clip_by_value_0/..."``, ``"clip_by_value_1/..."``).

    The values are the arrays held in the state: converting them to Python
    numbers (``float(v)``, ``jax.device_get``) is the only sync, and it can be
    done every N steps. A NaN or inf ``grad_norm`` means non-finite
    gradients; :func:`stats_records` also gives the ``nonfinite`` flag.

    Args:
      opt_state: any optimizer state (see :func:`stats_records`).

    Returns:
      ``{key: scalar array}``; empty when no optclip clipper is present.

    Example:
      >>> import jax.numpy as jnp, optax, optclip
      >>> tx = optax.chain(optclip.clip_by_global_norm(1.0), optax.sgd(0.1))
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
      >>> {k: v.item() for k, v in optclip.stats(state).items()}
      {'grad_norm': 5.0, 'threshold': 1.0, 'scale': 0.2, 'clipped': True}
    """
    records = stats_records(opt_state)
    names = [n for n, _ in records]
    out: dict[str, jax.Array] = {}
    seen: dict[str, int] = {}
    for name, rec in records:
        keys = CLIP_KEYS if isinstance(rec, ClipStats) else GUARD_KEYS
        if len(records) == 1:
            prefix = ""
        elif names.count(name) > 1:
            i = seen.get(name, 0)
            seen[name] = i + 1
            prefix = f"{name}_{i}/"
        else:
            prefix = f"{name}/"
        for k in keys:
            out[prefix + k] = getattr(rec, k)
    return out
