"""What the benchmark measures: every optclip clipper and guard, its Optax counterpart, baselines.

Each entry gives the transformation alone (its ``update`` is what the many-leaves
trees compile) and the train step's optimizer (the clipper chained with
``optax.adam``). ``counterpart`` names the entry its step and compile times are
compared to: Optax's equivalent, or ``adam`` alone where Optax has none.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optclip

LR = 1e-3


def adam() -> optax.GradientTransformation:
    return optax.adam(LR)


def fused_clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """The hand-fused global-norm clip: one reduction, then one multiply by a scalar.

    No stats, no overflow safety, no NaN handling: the floor a global-norm clip's step can
    reach. (Not its compile time on many small leaves: one reduction per leaf compiled in
    2.33x optclip's update on 1,000 leaves, ``bench/results/cpu_compile_floors/``.)
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        leaves = jax.tree.leaves(updates)
        sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)
        scale = jnp.minimum(1.0, max_norm * jax.lax.rsqrt(sq))  # rsqrt(0) = inf: scale 1
        return jax.tree.map(lambda x: x * scale.astype(x.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def fused_value(max_value: float, norm_after: bool = False,
                stats: str = "both") -> optax.GradientTransformation:
    """A hand-fused clip by value that keeps the stats a clamp needs: the L2 norm of the
    updates and whether any element was clamped (their largest magnitude above the bound),
    and with ``norm_after`` the L2 norm of the clamped updates too.

    One sum of squares and one max reduction per leaf (and a sum of clamped squares), then
    ``jnp.clip``: the floor for ``clip_by_value``'s step with its stats, on a step that clamps
    nothing (where the norm after the clamp is the norm before). With ``norm_after`` the norm
    after is a third reduction on every step (``clip_by_value`` takes it in a ``lax.cond``): a
    form, not a floor, for a step that clamps or for a first call. No overflow safety and no
    NaN handling (``jnp.clip``, as ``optax.clip``, lets a NaN through and clamps an inf; a NaN
    makes the max NaN and the flag False): a diagnostic for ``python -m bench.gn_probe``.

    ``stats`` (diagnostics of what one stat costs, ``bench/results/cpu_value_onepass/``):
    ``"both"``, the two reductions above; ``"norm"`` or ``"max"``, only the one (the other
    stat is 0 or False); ``"one_pass"``, both from one variadic ``lax.reduce`` per leaf along
    rows of up to 4,096 elements (as ``optclip.clippy`` takes its min and its sums), then a
    sum and a max of the rows'.
    """
    if stats not in ("both", "norm", "max", "one_pass"):
        raise ValueError(f"stats must be 'both', 'norm', 'max' or 'one_pass'; got {stats!r}.")

    def one_pass(x):
        x = jnp.ravel(x)
        row = next((k for k in range(4096, 255, -1) if x.size % k == 0), x.size)
        x = x.reshape(x.size // row, row)
        sq, big = jax.lax.reduce((jnp.square(x), jnp.abs(x)), (jnp.float32(0), jnp.float32(0)),
                                 lambda a, b: (a[0] + b[0], jnp.maximum(a[1], b[1])), (1,))
        return jnp.sum(sq), jnp.max(big)

    def update_fn(updates, state, params=None):
        del params
        leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(updates)]
        zero = jnp.zeros((), jnp.float32)
        if stats == "one_pass":
            pairs = [one_pass(x) for x in leaves]
            sq = sum(t[0] for t in pairs)
            big = functools.reduce(jnp.maximum, [t[1] for t in pairs])
        else:
            sq = (sum(jnp.sum(jnp.square(x)) for x in leaves) if stats != "max" else zero)
            big = (functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x)) for x in leaves])
                   if stats != "norm" else zero)
        after = (jnp.sqrt(sum(jnp.sum(jnp.square(jnp.minimum(jnp.abs(x), max_value)))
                              for x in leaves)) if norm_after else zero)
        clipped = jax.tree.map(lambda x: jnp.clip(x, -max_value, max_value), updates)
        return clipped, (jnp.sqrt(sq), big > max_value, after)

    return optax.GradientTransformation(
        lambda params: (jnp.zeros((), jnp.float32), jnp.zeros((), bool),
                        jnp.zeros((), jnp.float32)), update_fn)


def fused_agc(clipping: float, eps: float = 1e-3) -> optax.GradientTransformation:
    """A hand-fused unit-wise AGC: per leaf, the unit norms of the updates and of the params
    (over every axis but the last, or the whole leaf when it has one axis or none), then one
    multiply by ``min(1, clipping * max(|w|, eps) / |g|)``.

    No stats, no NaN handling, no overflow safety: a reference for what an AGC costs (a
    diagnostic for ``python -m bench.gn_probe``). On XLA:CPU it compiles to the same kernels
    as ``optax.adaptive_grad_clip``; on an H200 Optax's ran faster on GPT-2
    (``bench/results/h200_e3f0246/call2/gn_probe_agc.log``), so it is no floor there.
    """

    def one(g, w):
        ax = tuple(range(g.ndim - 1)) if g.ndim > 1 else None
        gn = jnp.sqrt(jnp.sum(jnp.square(g), axis=ax, keepdims=True))
        mx = clipping * jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(w), axis=ax, keepdims=True)),
                                    eps)
        return g * jnp.where(gn > mx, mx / jnp.where(gn > mx, gn, 1.0), 1.0)

    def update_fn(updates, state, params=None):
        return jax.tree.map(one, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def fused_leaf_norm(max_norm: float) -> optax.GradientTransformation:
    """A hand-fused per-leaf norm clip: per leaf one sum of squares, then one multiply by
    ``min(1, max_norm / |g|)``.

    No stats, no NaN handling, no overflow safety: a per-leaf clipper's work and nothing
    else (``clip_by_leaf_norm``'s; ``clip_by_block_rms`` and ``adagc`` do this work and more),
    a reference for first calls (``python -m bench.compile_probe``).
    """

    def one(g):
        n = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
        return g * jnp.where(n > max_norm, max_norm / jnp.where(n > max_norm, n, 1.0),
                             1.0).astype(g.dtype)

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(one, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def fused_clippy(lambda_rel: float, lambda_abs: float,
                 norm: bool | str = False) -> optax.GradientTransformation:
    """A hand-fused Clippy (Tang et al. 2023): per leaf one min reduction of
    ``(lambda_rel |w| + lambda_abs) / |u|`` (inf where ``u`` is 0), then one multiply by
    ``min(1, that min)``.

    No stats, no NaN handling: ``clippy``'s work and nothing else, a reference for first
    calls (``python -m bench.compile_probe``). With ``norm`` it also takes the one stat that
    reads the updates again, their global L2 norm (kept in its state), still with no overflow
    safety: with ``norm=True`` by one sum of squares a leaf beside the min, as ``clippy``
    takes it; with ``norm="one_pass"`` in the same pass as the min, one variadic
    ``lax.reduce`` a leaf giving both along its last axis (per row), then a min and a sum
    of the rows'.
    """

    def ratios(u, w):
        bound = lambda_rel * jnp.abs(w) + lambda_abs
        a = jnp.abs(u)
        return jnp.where(a > 0, bound / jnp.where(a > 0, a, 1.0), jnp.inf)

    def one(u, w):
        if u.size == 0:  # no coordinate sets a bound
            return u, jnp.zeros((), jnp.float32)
        if norm == "one_pass":
            # along the last axis, then over the rows (XLA:CPU's variadic reduction loses
            # precision over long runs: over all 2**25 elements of one array its float32
            # sum was off by 7.2%, bench/results/cpu_traffic/one_pass.log)
            m, sq = jax.lax.reduce(
                (ratios(u, w), jnp.square(u.astype(jnp.float32))),
                (jnp.array(jnp.inf, jnp.float32), jnp.array(0, jnp.float32)),
                lambda a, b: (jnp.minimum(a[0], b[0]), a[1] + b[1]), (u.ndim - 1,))
            m, sq = jnp.min(m), jnp.sum(sq)
        else:
            m = jnp.min(ratios(u, w))
            sq = jnp.sum(jnp.square(u.astype(jnp.float32))) if norm else None
        return u * jnp.minimum(1.0, m).astype(u.dtype), sq

    def update_fn(updates, state, params=None):
        pairs = jax.tree.map(one, updates, params)
        is_pair = lambda t: isinstance(t, tuple)  # noqa: E731
        out = jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair)
        if not norm:
            return out, state
        return out, jnp.sqrt(sum(t[1] for t in jax.tree.leaves(pairs, is_leaf=is_pair)))

    return optax.GradientTransformation(
        lambda params: jnp.zeros((), jnp.float32) if norm else optax.EmptyState(), update_fn)


# one row of a 2-D array per index (as ``m.at[idx].get()``)
_ROW_DIMS = jax.lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,),
                                           start_index_map=(0,))


def _stacked(per_stack: Callable[..., jax.Array]) -> Callable:
    """An update that groups the leaves by shape, computes ``per_stack(*stacks)`` on each
    group's stacked updates (and params, when given), and hands each leaf its row back by a
    gather whose index is a constant operand (as ``optclip.norms`` takes each leaf's part of
    a vector on XLA:CPU: a slice's offset is part of its kernel, so every leaf would compile
    a kernel of its own)."""

    def update_fn(updates, state, params=None):
        leaves, treedef = jax.tree.flatten(updates)
        ws = treedef.flatten_up_to(params) if params is not None else None
        groups: dict[tuple, list[int]] = {}
        for i, g in enumerate(leaves):
            groups.setdefault((g.shape, g.dtype), []).append(i)
        out: list[Any] = [None] * len(leaves)
        for (shape, _), js in groups.items():
            stacks = [jnp.stack([leaves[i] for i in js])]
            if ws is not None:
                stacks.append(jnp.stack([jnp.asarray(ws[i]) for i in js]))
            res = per_stack(*stacks).reshape(len(js), -1)
            for k, i in enumerate(js):
                # a second index keeps a row's index from being a single value, which XLA
                # folds back into a slice (a one-row group's [0, 0] XLA folds away, gather
                # and all: harmless, as such a group's shape is the only one of its kind)
                idx = np.array([[k], [0 if k else len(js) - 1]], np.int32)
                row = jax.lax.gather(res, idx, _ROW_DIMS, (1, res.shape[1]),
                                     mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)
                out[i] = row[0].reshape(shape)
        return treedef.unflatten(out), state

    return update_fn


def stacked_agc(clipping: float, eps: float = 1e-3) -> optax.GradientTransformation:
    """:func:`fused_agc` computed on stacks of the leaves of one shape (:func:`_stacked`),
    as ``agc`` reduces small leaves; units as in :func:`fused_agc`.

    No stats, no NaN handling, no overflow safety: a reference for what an AGC compiles in
    on many small leaves (``python -m bench.compile_probe --alone``), where the per-leaf
    :func:`fused_agc` has a kernel or more per leaf.
    """

    def per_stack(g, w):
        ax = tuple(range(1, g.ndim - 1)) if g.ndim > 2 else tuple(range(1, g.ndim))
        gn = jnp.sqrt(jnp.sum(jnp.square(g), axis=ax, keepdims=True))
        mx = clipping * jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(w), axis=ax, keepdims=True)),
                                    eps)
        return g * jnp.where(gn > mx, mx / jnp.where(gn > mx, gn, 1.0), 1.0)

    return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                        _stacked(per_stack))


def stacked_clippy(lambda_rel: float, lambda_abs: float) -> optax.GradientTransformation:
    """:func:`fused_clippy` computed on stacks of the leaves of one shape (:func:`_stacked`):
    a reference for many small leaves, as :func:`stacked_agc`. (``clippy`` itself stacks
    its small tensors raveled, as rows, those of a size no other has zero-padded, and takes
    each row's min.)"""

    def per_stack(u, w):
        if u.size == 0:
            return u
        ax = tuple(range(1, u.ndim))
        bound = lambda_rel * jnp.abs(w) + lambda_abs
        a = jnp.abs(u)
        r = jnp.where(a > 0, bound / jnp.where(a > 0, a, 1.0), jnp.inf)
        return u * jnp.minimum(1.0, jnp.min(r, axis=ax, keepdims=True)).astype(u.dtype)

    return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                        _stacked(per_stack))


@dataclass(frozen=True)
class Entry:
    name: str
    alone: Callable[[], optax.GradientTransformation]  # the transformation by itself
    chain: Callable[[], optax.GradientTransformation]  # the train step's optimizer
    described: str  # the chain, as the table prints it
    kind: str  # "optclip", "optax" or "baseline"
    counterpart: str | None = None  # entry compared against (optax's equivalent, else adam)
    family: str = ""  # "static", "per-leaf", "adaptive", "guard", "update-space"


def _with_adam(make: Callable[[], optax.GradientTransformation]):
    return lambda: optax.chain(make(), adam())


def entries() -> dict[str, Entry]:
    """name -> Entry, in table order: baselines, then Optax's clippers, then optclip's."""
    e: list[Entry] = [
        Entry("adam", optax.identity, adam, "adam", "baseline"),
        Entry("fused_global_norm", lambda: fused_clip_by_global_norm(1.0),
              _with_adam(lambda: fused_clip_by_global_norm(1.0)),
              "hand-fused clip (1 reduction, 1 scalar multiply) + adam", "baseline"),
        # hand-fused references for first calls (python -m bench.compile_probe): no stats,
        # no NaN handling, no overflow safety; not in python -m bench's runs
        Entry("fused_value", lambda: fused_value(0.1), _with_adam(lambda: fused_value(0.1)),
              "hand-fused clip by value with its norm and clamp flag + adam", "baseline"),
        # and with the norm after the clamp, which clip_by_value compiles (in a lax.cond)
        Entry("fused_value_after", lambda: fused_value(0.1, norm_after=True),
              _with_adam(lambda: fused_value(0.1, norm_after=True)),
              "hand-fused clip by value with its norm, clamp flag and norm after + adam",
              "baseline"),
        Entry("fused_leaf_norm", lambda: fused_leaf_norm(1.0),
              _with_adam(lambda: fused_leaf_norm(1.0)),
              "hand-fused per-leaf norm clip + adam", "baseline"),
        Entry("fused_agc", lambda: fused_agc(0.01), _with_adam(lambda: fused_agc(0.01)),
              "hand-fused AGC + adam", "baseline"),
        Entry("stacked_agc", lambda: stacked_agc(0.01), _with_adam(lambda: stacked_agc(0.01)),
              "hand-fused AGC on stacks of leaves of one shape + adam", "baseline"),
        Entry("fused_clippy", lambda: fused_clippy(0.1, 1e-7),
              lambda: optax.chain(adam(), fused_clippy(0.1, 1e-7)),
              "adam + hand-fused clippy", "baseline"),
        # with the one stat that reads the updates again, their norm, from the same pass as the
        # min (no overflow safety): a reference for clippy's first call
        Entry("fused_clippy_stat", lambda: fused_clippy(0.1, 1e-7, norm="one_pass"),
              lambda: optax.chain(adam(), fused_clippy(0.1, 1e-7, norm="one_pass")),
              "adam + hand-fused clippy with its norm stat from the same pass", "baseline"),
        Entry("stacked_clippy", lambda: stacked_clippy(0.1, 1e-7),
              lambda: optax.chain(adam(), stacked_clippy(0.1, 1e-7)),
              "adam + hand-fused clippy on stacks of leaves of one shape", "baseline"),
        # Optax's counterparts
        Entry("optax.clip", lambda: optax.clip(0.1), _with_adam(lambda: optax.clip(0.1)),
              "optax.clip(0.1) + adam", "optax"),
        Entry("optax.clip_by_global_norm", lambda: optax.clip_by_global_norm(1.0),
              _with_adam(lambda: optax.clip_by_global_norm(1.0)),
              "optax.clip_by_global_norm(1.0) + adam", "optax"),
        Entry("optax.clip_by_block_rms", lambda: optax.clip_by_block_rms(1e-3),
              _with_adam(lambda: optax.clip_by_block_rms(1e-3)),
              "optax.clip_by_block_rms(1e-3) + adam", "optax"),
        Entry("optax.adaptive_grad_clip", lambda: optax.adaptive_grad_clip(0.01),
              _with_adam(lambda: optax.adaptive_grad_clip(0.01)),
              "optax.adaptive_grad_clip(0.01) + adam", "optax"),
        Entry("optax.apply_if_finite", lambda: optax.apply_if_finite(optax.identity(), 10**9),
              lambda: optax.apply_if_finite(adam(), 10**9),
              "optax.apply_if_finite(adam, 10**9)", "optax"),
        # optclip
        Entry("clip_by_value", lambda: optclip.clip_by_value(0.1),
              _with_adam(lambda: optclip.clip_by_value(0.1)),
              "clip_by_value(0.1) + adam", "optclip", "optax.clip", "static"),
        # The bench's gradients are N(0, 0.01^2): 0.1 clamps nothing (the step of a generous
        # bound), 0.01 clamps a third of the elements (the step of a tight one).
        Entry("clip_by_value_clamping", lambda: optclip.clip_by_value(0.01),
              _with_adam(lambda: optclip.clip_by_value(0.01)),
              "clip_by_value(0.01) + adam, clamping a third of the elements", "optclip",
              "optax.clip", "static"),
        Entry("clip_by_global_norm", lambda: optclip.clip_by_global_norm(1.0),
              _with_adam(lambda: optclip.clip_by_global_norm(1.0)),
              "clip_by_global_norm(1.0) + adam", "optclip", "optax.clip_by_global_norm",
              "static"),
        Entry("clip_by_block_rms", lambda: optclip.clip_by_block_rms(1e-3),
              _with_adam(lambda: optclip.clip_by_block_rms(1e-3)),
              "clip_by_block_rms(1e-3) + adam", "optclip", "optax.clip_by_block_rms",
              "per-leaf"),
        Entry("clip_by_leaf_norm", lambda: optclip.clip_by_leaf_norm(1.0),
              _with_adam(lambda: optclip.clip_by_leaf_norm(1.0)),
              "clip_by_leaf_norm(1.0) + adam", "optclip", "adam", "per-leaf"),
        Entry("agc", lambda: optclip.agc(0.01), _with_adam(lambda: optclip.agc(0.01)),
              "agc(0.01) + adam", "optclip", "optax.adaptive_grad_clip", "per-leaf"),
        Entry("autoclip", lambda: optclip.autoclip(10.0),
              _with_adam(lambda: optclip.autoclip(10.0)),
              "autoclip(10) + adam", "optclip", "adam", "adaptive"),
        Entry("autoclip_h1000", lambda: optclip.autoclip(10.0, history=1000),
              _with_adam(lambda: optclip.autoclip(10.0, history=1000)),
              "autoclip(10, history=1000) + adam", "optclip", "adam", "adaptive"),
        # warmup_steps=1: the steps timed are past the warm-up, as in a long run
        Entry("zclip", lambda: optclip.zclip(warmup_steps=1),
              _with_adam(lambda: optclip.zclip(warmup_steps=1)),
              "zclip(warmup_steps=1) + adam", "optclip", "adam", "adaptive"),
        Entry("adagc", lambda: optclip.adagc(warmup_steps=1),
              _with_adam(lambda: optclip.adagc(warmup_steps=1)),
              "adagc(warmup_steps=1) + adam", "optclip", "adam", "adaptive"),
        # guards wrap the optimizer; alone, they wrap optax.identity()
        Entry("skip_nonfinite", lambda: optclip.skip_nonfinite(optax.identity()),
              lambda: optclip.skip_nonfinite(adam()),
              "skip_nonfinite(adam)", "optclip", "optax.apply_if_finite", "guard"),
        Entry("skip_on_spike",
              lambda: optclip.skip_on_spike(optax.identity(), warmup_steps=1),
              lambda: optclip.skip_on_spike(adam(), warmup_steps=1),
              "skip_on_spike(adam, warmup_steps=1)", "optclip", "adam", "guard"),
    ]
    if hasattr(optclip, "clippy"):  # update-space clipping, after the optimizer
        e.append(Entry("clippy", lambda: optclip.clippy(0.1, 1e-7),
                       lambda: optax.chain(adam(), optclip.clippy(0.1, 1e-7)),
                       "adam + clippy(0.1, 1e-7)", "optclip", "adam", "update-space"))
    return {x.name: x for x in e}


OPTCLIP = ("clip_by_value", "clip_by_value_clamping", "clip_by_global_norm", "clip_by_block_rms",
           "clip_by_leaf_norm", "agc", "autoclip", "autoclip_h1000", "zclip", "adagc",
           "skip_nonfinite", "skip_on_spike", "clippy")
GN = "clip_by_global_norm"  # "the global-norm chain" of the targets
# step time only: their update compiles as another entry's does (not in the many-leaves runs)
STEP_ONLY = ("clip_by_value_clamping",)


# ---- the targets, as (numerator, denominator, bound) -------------------------------

def step_ratios(names: list[str]) -> list[tuple[str, str, float | None]]:
    """The step-time ratios to report for the optclip entries in ``names`` (bound None: none)."""
    out: list[tuple[str, str, float | None]] = []
    for n in names:
        if n in ("clip_by_value", "clip_by_value_clamping"):
            out += [(n, "optax.clip", 1.05), (n, "adam", None)]
        elif n == "clip_by_global_norm":
            out += [(n, "fused_global_norm", 1.03), (n, "optax.clip_by_global_norm", None),
                    (n, "adam", None), ("fused_global_norm", "adam", None),
                    ("optax.clip_by_global_norm", "adam", None)]
        elif n == "agc":
            out += [(n, "adam", 1.35), (n, "optax.adaptive_grad_clip", None), (n, GN, None)]
        elif n == "clip_by_block_rms":
            out += [(n, GN, 1.05), (n, "optax.clip_by_block_rms", None), (n, "adam", None)]
        elif n == "skip_nonfinite":
            out += [(n, GN, 1.05), (n, "optax.apply_if_finite", None), (n, "adam", None)]
        elif n == "clippy":  # no target is stated for update-space clipping
            out += [(n, "adam", None), (n, GN, None)]
        elif n in OPTCLIP:  # per-leaf, adaptive and guards: against the global-norm chain
            out += [(n, GN, 1.05), (n, "adam", None)]
    return out


def needed(names: list[str]) -> list[str]:
    """``names`` and every entry their ratios are measured against, in table order."""
    want = set(names)
    for num, den, _ in step_ratios(names):
        want |= {num, den}
    for n in names:
        c = entries()[n].counterpart
        if c:
            want.add(c)
        if entries()[n].kind == "optclip" and n != GN:
            want.add(GN)  # the compile target's alternative: <= global-norm chain + 1 s
    return [n for n in entries() if n in want]
