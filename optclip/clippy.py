"""Update-space clipping: Clippy (Tang et al. 2023).

Clippy clips the *update* an optimizer is about to apply, not the gradient:
each tensor's update is shrunk so that no coordinate moves by more than a
fraction of its own weight. It therefore goes *after* the optimizer, with the
learning rate already applied.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optclip import norms as _n
from optclip._common import (
    Threshold,
    check_state,
    check_threshold,
    f32,
    increment,
    maybe_raise_nonfinite,
    mul0,
    resolve,
    transformation,
)
from optclip.norms import AxisName
from optclip.stats import ClipStats

__all__ = ["ClippyState", "clippy"]


class ClippyState(NamedTuple):
    """State of :func:`clippy`.

    Attributes:
      count: int32 scalar, the number of updates so far (drives schedules).
      stats: the latest :class:`~optclip.ClipStats`.
    """

    count: jax.Array
    stats: ClipStats

    optclip_name = "clippy"


@jax.custom_jvp
def _quotient(a: jax.Array, lam_rel: jax.Array, lam_abs: jax.Array, d: jax.Array) -> jax.Array:
    """``(lam_rel a + lam_abs) / d`` (``d > 0``; ``inf * 0 = 0``), whose derivatives are
    clamped to the dtype's range.

    The true derivative with respect to ``d``, ``-bound / d**2``, overflows where ``|u_j|``
    is tiny (1e-25 against a bound of 0.1), and those with respect to ``a`` and ``d`` are
    inf where a threshold is. Such a ratio is large, and the min does not select it:
    ``jax.grad`` multiplies its derivatives by a zero cotangent, and ``0 * inf`` made the
    update's gradient NaN. Clamped, they are 0 there; where the min does select such a
    ratio, the true derivative is beyond the dtype anyway.
    """
    # (lax primitives, as in :func:`_ratios`: ``mul0(a, lam_rel)``, then ``+ lam_abs``, ``/ d``)
    lr = lax.broadcast_in_dim(lam_rel, a.shape, ())
    zero = lax.full_like(a, 0)
    prod = lax.select(lax.bitwise_or(lax.eq(a, zero), lax.eq(lr, zero)), zero, lax.mul(a, lr))
    return lax.div(lax.add(prod, lax.broadcast_in_dim(lam_abs, a.shape, ())), d)


@_quotient.defjvp
def _quotient_jvp(primals, tangents):
    (a, lr, la, d), (t_a, t_lr, t_la, t_d) = primals, tangents
    q = _quotient.fun(a, lr, la, d)
    big = jnp.asarray(jnp.finfo(q.dtype).max, q.dtype)
    zero = jnp.zeros((), q.dtype)
    fin = lambda x: jnp.minimum(x, big)  # noqa: E731  (all >= 0, or NaN)
    masked = (a == 0) | (lr == 0)  # mul0's 0: a product that is 0 whatever the other
    c_a = jnp.where(masked, zero, fin(lr / d))
    c_lr = jnp.where(masked, zero, fin(a / d))
    t = t_a * c_a + t_lr * c_lr + t_la * fin(1 / d) - t_d * fin(q / d)
    # an infinite ratio (an infinite bound) is a constant: tied, as every ratio is under an
    # infinite threshold, clamped tangents summed by the min's rule overflowed (forward mode)
    return q, jnp.where(jnp.isinf(q), zero, t)


def _ratios(u: jax.Array, w: jax.Array, lam_rel: jax.Array, lam_abs: jax.Array,
            acc: Any) -> jax.Array:
    """Element-wise ``(lam_rel |w_j| + lam_abs) / |u_j|``: inf where ``u_j`` is 0, subnormal
    or not finite (no bound), -1 where the bound is NaN (a NaN weight) and ``u_j`` counts.

    The NaN is marked by a negative value, which no bound has, rather than left to the min:
    XLA:CPU's min reduction (YNNPACK, jax 0.10) neither propagates a NaN nor skips it, but
    returns some other element (``python -m bench.xla_probe update_space``). The marker also
    crosses devices in the ``pmin`` that a NaN might not survive.
    """
    # In lax primitives: a model's tensors trace this once each (its pieces), and jnp's
    # functions (each a jit of its own) and promotion were most of the update's trace time.
    d = _n.abs_in(u, acc)
    # A subnormal |u_j| counts as 0 (no bound), as XLA flushes it in the division: bound / d
    # would be 0 / 0 there, a NaN factor where the update is finite.
    active = lax.bitwise_and(lax.is_finite(d),
                             lax.ge(d, lax.full_like(d, float(jnp.finfo(acc).tiny))))
    a = _n.abs_in(w, acc)  # (params of any dtype: unsigned and bool ones too)
    lr = lax.convert_element_type(lam_rel, acc)
    # The bound is NaN where the weight is and lam_rel is not 0 (mul0); the thresholds are not
    # NaN (an invalid one is 0 here). The untaken branch divides by 1, so value and derivative
    # are finite at u_j = 0.
    q = _quotient(a, lr, lax.convert_element_type(lam_abs, acc),
                  lax.select(active, d, lax.full_like(d, 1)))
    nan_bound = lax.select(lax.ne(lr, lax.full_like(lr, 0)), lax.ne(a, a),
                           lax.full_like(a, False, bool))
    ratio = lax.select(nan_bound, lax.full_like(q, -1), q)
    return lax.select(active, ratio, lax.full_like(q, float("inf")))


class _Pieces(NamedTuple):
    """The float tensors laid out for their norms and their ratios' minima (:func:`_pieces`).

    ``arrays[i]`` yields the units ``leaves[i]`` (tensor indices, in order): a large tensor
    one unit, itself; a stack one unit per row, a tensor per row. ``unit_axes[i]`` is the
    axis a unit spans (None: all; 1: each row), ``mesh[i]`` the mesh axes of its tensors
    (None: no mesh given)."""

    arrays: list[Any]
    params: list[Any]
    leaves: list[list[int]]
    unit_axes: list[Any]
    mesh: list[Any] | None


def _pieces(us: list[jax.Array], ws: list[jax.Array], axes: list[Any] | None) -> _Pieces:
    """Large tensors as they are; the small ones (up to ``norms.SMALL_LEAF`` elements)
    raveled and stacked as rows, shared by the norms and the ratios.

    Small tensors are grouped by dtype and mesh axes (inside ``shard_map`` a replicated
    tensor stacked with a sharded one would be typed as sharded). In a group, tensors of
    one size are stacked as they are; the others are zero-padded to a power-of-two width
    and stacked by width (a zero update sets no bound and adds nothing to a norm), but for
    one alone in its width, which is a row as it is. Each stack is then reduced along its
    rows, in one pass for the norms and the ratios (:func:`_one_pass`).

    XLA:CPU compiles every kernel, so that a model's hundreds of small biases and scales,
    each with its own norm, ratios and min, cost seconds of compile time; and it writes a
    stack out in full. One stack of the updates and one of the weights, built once for the
    norms and the ratios, hold 2x the small tensors in temporaries (more where rows are
    padded); the norms' own stack beside a concatenation of updates and weights for a
    segment min held 5x (``python -m bench --trees '' --clippers clippy``).
    """
    arrays, params, leaves, unit_axes, mesh = [], [], [], [], []
    groups: dict[tuple, list[int]] = {}
    for j, (u, w) in enumerate(zip(us, ws, strict=True)):
        ax = None if axes is None else axes[j]
        if u.size > _n.SMALL_LEAF:
            arrays.append(u)
            params.append(w)
            leaves.append([j])
            unit_axes.append(None)
            mesh.append(ax)
        elif u.size:
            groups.setdefault((u.dtype, w.dtype, ax), []).append(j)
    for (_, _, ax), js in groups.items():
        rows: dict[tuple, list[int]] = {}
        by_size: dict[int, list[int]] = {}
        for j in js:
            by_size.setdefault(us[j].size, []).append(j)
        for size, ks in by_size.items():
            key = ("size", size) if len(ks) > 1 else ("width", _n._bucket(size))
            rows.setdefault(key, []).extend(ks)
        for (_, width), ks in rows.items():
            if len(ks) == 1:  # alone in its width: a row of its own size, no padded copy
                width = us[ks[0]].size
            def stack(xs: list[jax.Array], width: int = width) -> jax.Array:
                # (lax primitives: jnp's ravel, pad and stack cost more Python per tensor,
                # though a jnp.stack is one equation where this takes a reshape for each
                # tensor; bench/results/cpu_split_trace/)
                rows = [lax.reshape(x, (1, x.size)) for x in xs]
                rows = [r if r.size == width else lax.pad(
                    r, lax.full((), 0, r.dtype), ((0, 0, 0), (0, width - r.size, 0)))
                    for r in rows]
                return rows[0] if len(rows) == 1 else lax.concatenate(rows, 0)
            arrays.append(stack([us[k] for k in ks]))
            params.append(stack([ws[k] for k in ks]))
            leaves.append(ks)
            unit_axes.append(1)
            mesh.append(ax)
    return _Pieces(arrays, params, leaves, unit_axes, None if axes is None else mesh)


# The longest run that one variadic reduction sums in order: XLA:CPU emits it as a loop that
# adds each element to the running float32 sum in turn, so its error grows with the run where
# rounding errors do not cancel. The sum of squares of 2**25 normal floats, as one run, was
# off by 7.5%; as rows of 65,536 by 7.1e-6, of 16,384 by 1.1e-6, of 4,096 by 9.9e-8, where
# a plain sum was off by 3.9e-8 (``bench/results/cpu_clippy_onepass/row_width.log``); over
# updates of one magnitude (+-1e-3, as Adam's first steps are), rows of 256 to 4,096 were off
# by 2.9e-6 to 4.9e-6 (16,384: 7.3e-5), where a plain sum was off by 1.6e-8. Only the stats'
# norm takes this sum. The rows' results are then reduced by plain reductions. A tensor
# reduced whole whose trailing dims make rows shorter than ``_ROW_MIN`` takes part of the dim
# before them into each row; one whose split dim has no divisor that keeps rows between the
# two (and ``_SPLIT_PARTS``) takes plain reductions (and XLA:CPU writes its update out once
# more). A row that spans a sharded dim leaves partial results that XLA gathers across the
# devices (a variadic reduction cannot be all-reduced): rows' results times the devices,
# 1/row of the tensor each.
_ROW = 1 << 12
_ROW_MIN = 1 << 8
# A split last axis keeps this many (or its largest power of two) equal parts in front of the
# rows, so that a last axis sharded across up to that many devices (a power of two) under
# jit's NamedSharding splits along its shards: a split that cut across them made XLA gather
# the whole tensor onto every device.
_SPLIT_PARTS = 16


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _variadic(ops: tuple[jax.Array, ...], dims: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """The min of ``ops[0]`` and the sums of the others over ``dims``, in one reduction."""
    inits = (jnp.array(jnp.inf, ops[0].dtype),) + tuple(jnp.zeros((), t.dtype) for t in ops[1:])
    return tuple(lax.reduce(
        ops, inits, lambda a, b: (jnp.minimum(a[0], b[0]),) + tuple(
            x + y for x, y in zip(a[1:], b[1:], strict=True)), dims))


@_variadic.defjvp
def _variadic_jvp(dims, primals, tangents):
    # JAX's own rule for a variadic reduction fails on symbolic-zero tangents (only the
    # weights or a threshold differentiated: Blue's terms have none); here they arrive as
    # arrays.
    (ops,), (dops,) = primals, tangents
    return jax.jvp(lambda *o: _variadic.fun(o, dims), ops, dops)


def _one_pass(u: jax.Array, w: jax.Array, ax: Any, lam_rel: jax.Array, lam_abs: jax.Array,
              acc: Any) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Per unit of a piece (flat vectors; ``ax`` as in :class:`_Pieces`): the min of
    :func:`_ratios` and the sums of :func:`optclip.norms.blue_terms` of ``u``, from one
    pass over ``u`` and ``w``.

    One variadic ``lax.reduce`` gives all four along rows of at most ``_ROW`` elements (the
    trailing reduced dims, or the last one split), then plain reductions over the rows'
    results. A min and a separate sum of squares with an overflow rescue behind a
    ``lax.cond`` made XLA write the update out twice more, and hold it twice more in
    temporaries (``python -m bench.traffic --only clippy``).
    """
    # Blue's terms carry no derivative: the norms' comes from :func:`_norms_of`
    ops = (_ratios(u, w, lam_rel, lam_abs, acc),) + _n.blue_terms(lax.stop_gradient(u), acc)
    red = tuple(range(u.ndim)) if ax is None else _n._reduced_dims(ax, u.ndim)  # trailing
    first, width = _row_dims(u.shape, red)
    shape = u.shape

    def plain():  # no row split: plain reductions over the whole of each unit
        return (jnp.ravel(jnp.min(ops[0], axis=red)),
                tuple(jnp.ravel(jnp.sum(t, axis=red)) for t in ops[1:]))

    if ax is None and first and min(first) > 0 and width < _ROW_MIN:
        # Short trailing rows (a (n, 8) table) would write out too many rows' results: each
        # row takes k of the dim before them too, split off it as an inner part. Raveling
        # instead merged the trailing dims into it, and under jit's NamedSharding XLA then
        # gathered a tensor sharded along them onto every device.
        j = min(first) - 1
        k = _split(shape[j], _ROW // width, -(-_ROW_MIN // width))
        if k is None:
            return plain()
        shape = shape[:j] + (shape[j] // k, k) + shape[j + 1:]
        ops = tuple(t.reshape(shape) for t in ops)
        red = tuple(range(len(shape)))
        first = [d + 1 for d in first] + [j + 1]
    nd = len(shape)
    rest = tuple(d for d in red if d not in first)
    if not first:  # the last axis alone is longer than a row: split it
        n = shape[-1]
        row = _split(n, _ROW, _ROW_MIN)
        if row is None:
            return plain()
        ops = tuple(t.reshape(shape[:-1] + (n // row, row)) for t in ops)
        first = [nd]  # and the last axis's outer part, in ``rest`` already
    m, *sums = _variadic(ops, tuple(first))
    if rest:
        m, sums = jnp.min(m, axis=rest), [jnp.sum(t, axis=rest) for t in sums]
    return jnp.ravel(m), tuple(jnp.ravel(t) for t in sums)


# :func:`_one_pass` traced once for each distinct (shapes, dtypes, unit axis): a model's
# repeated layers share one trace and one lowering, a call XLA inlines (GPT-2's 50 large tensors
# have 6 shapes: its chain's first call 2.32 -> 2.10 s in medians of 7, trace + lower 0.60 ->
# 0.42 s, ``bench/results/cpu_clippy_first_call/shared.log``).
_one_pass_shared = jax.jit(_one_pass, static_argnums=(2, 5))


def _split(n: int, most: int, least: int) -> int | None:
    """The largest inner part ``k`` of a dim of length ``n`` (``n = (n // k) * k``) within
    ``[least, most]`` whose outer part keeps ``gcd(n, _SPLIT_PARTS)`` equal parts, so that
    a dim sharded across that many devices splits along its shards; None when there is
    none."""
    parts = math.gcd(n, _SPLIT_PARTS)
    return next((k for k in range(min(most, n), least - 1, -1)
                 if n % k == 0 and (n // k) % parts == 0), None)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _pmin(xs: list[jax.Array], axes: Any) -> list[jax.Array]:
    """``lax.pmin``, differentiable (JAX has no rule for it): each min's derivative is that
    of the element it takes, averaged over the devices that hold it (ties)."""
    return lax.pmin(xs, axes)


@_pmin.defjvp
def _pmin_jvp(axes, primals, tangents):
    (xs,), (ts,) = primals, tangents
    ms = lax.pmin(xs, axes)
    outs = []
    for x, m, t in zip(xs, ms, ts, strict=True):
        held = x == m
        n = lax.psum(held.astype(x.dtype), axes)
        outs.append(lax.psum(jnp.where(held, t, jnp.zeros((), t.dtype)), axes) / n)
    return ms, outs


def _row_dims(shape: tuple[int, ...], red: tuple[int, ...]) -> tuple[list[int], int]:
    """The trailing dims of ``red`` whose product stays within ``_ROW``, and that product
    (none, and 1, when the last dim alone is longer)."""
    first, width = [], 1
    for d in reversed(red):
        if width * shape[d] > _ROW:
            break
        first.append(d)
        width *= shape[d]
    return first, width


def _factors_and_norms(pieces: _Pieces, lam_rel: jax.Array, lam_abs: jax.Array, acc: Any
                       ) -> tuple[jax.Array, jax.Array, jax.Array, list[jax.Array | None]]:
    """Per unit of the pieces, in their order (flat vectors): the factor :func:`_sigma` of
    ``min_j`` :func:`_ratios` and the L2 norm, each combined across the unit's mesh axes
    (``pmin``; ``psum`` of Blue's sums), and whether any element was NaN or inf; and per
    piece, the factor of a large tensor's piece (its one unit, shape ``(1,)``; None for a
    stack)."""
    if not pieces.arrays:
        return jnp.zeros((0,), acc), jnp.zeros((0,), acc), jnp.zeros((), bool), []
    pairs = [_one_pass_shared(u, w, ax, lam_rel, lam_abs, acc)
             for u, w, ax in zip(pieces.arrays, pieces.params, pieces.unit_axes, strict=True)]
    mins = _n.collect([m for m, _ in pairs], pieces.mesh, _pmin)
    sums = _n.collect([s for _, s in pairs], pieces.mesh, lax.psum)
    cat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs)  # noqa: E731
    sml, med, big = (cat([s[k] for s in sums]) for k in range(3))
    # finite inputs give finite sums (Blue's terms are bounded): only NaN or inf makes them not
    nonfinite = jnp.any(~jnp.isfinite(sml + med + big))
    norms = _norms_of(lax.stop_gradient(_n.blue_norm(sml, med, big)), tuple(pieces.arrays),
                      tuple(pieces.unit_axes), None if pieces.mesh is None else tuple(pieces.mesh))
    # The factors once, on one vector (a kernel each when taken piece by piece: 35 on
    # ResNet-50). A large tensor takes its own from its piece's min, in the kernel that
    # scales it, rather than by a gather from that vector (a kernel each: 53 on ResNet-50).
    own = [_sigma(m) if ax is None else None
           for m, ax in zip(mins, pieces.unit_axes, strict=True)]
    return _sigma(cat(mins)), norms, nonfinite, own


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _norms_of(norms: jax.Array, arrays: tuple[jax.Array, ...], unit_axes: tuple, mesh: Any
              ) -> jax.Array:
    """``norms``, the L2 norms of the units of the pieces ``arrays`` (in order; ``unit_axes``
    and ``mesh`` as in :class:`_Pieces`), given the derivative of those norms with respect
    to ``arrays``: ``sum_j Re(conj(u_j / norm) du_j)`` over each unit, 0 where its norm is 0
    or not finite.

    Differentiated through Blue's scaled sums, the norm of tiny updates (1e-20) had a NaN
    derivative, or one that underflowed to 0: the scales (2**107 and its square) overflow
    or underflow the cotangents that pass through them. Here ``u_j / norm`` is at most 1.
    """
    del arrays, unit_axes, mesh
    return norms


@_norms_of.defjvp
def _norms_of_jvp(unit_axes, mesh, primals, tangents):
    norms, arrays = primals
    _, t_arrays = tangents
    ok = (norms > 0) & jnp.isfinite(norms)
    # each norm brought into [2, 4) by a power of two, its elements with it (exact): XLA
    # divides by a scalar as a product with its reciprocal, which a norm above 2**126 made
    # subnormal, flushed to 0 (a zero derivative)
    down, _ = _n._pow2_scale(jnp.where(ok, norms, jnp.ones((), norms.dtype)))
    safe = jnp.where(ok, norms * down, jnp.ones((), norms.dtype))
    dots, o = [], 0
    for u, t, ax in zip(arrays, t_arrays, unit_axes, strict=True):
        k = 1 if ax is None else u.shape[0]
        nv, dv = (safe[o:o + k], down[o:o + k]) if ax is not None else (safe[o], down[o])
        if ax is not None:
            nv, dv = (v.reshape((k,) + (1,) * (u.ndim - 1)) for v in (nv, dv))
        o += k
        x = u.astype(norms.dtype) if not jnp.iscomplexobj(u) else u
        d = jnp.real(jnp.conj(x * dv.astype(x.dtype) / nv) * t.astype(x.dtype))
        dots.append(jnp.ravel(jnp.sum(d, axis=None if ax is None else tuple(range(1, u.ndim)))))
    dots = _n.collect(dots, None if mesh is None else list(mesh), lax.psum)
    cat = dots[0] if len(dots) == 1 else jnp.concatenate(dots)
    return norms, jnp.where(ok, cat.astype(norms.dtype), jnp.zeros((), norms.dtype))


def _sigma(ratio: jax.Array) -> jax.Array:
    """``min(1, ratio)``, NaN for :func:`_ratios`' NaN marker."""
    return lax.select(lax.lt(ratio, lax.full_like(ratio, 0)), lax.full_like(ratio, float("nan")),
                      lax.min(lax.full_like(ratio, 1), ratio))


def _apply(u: jax.Array, sigma: jax.Array) -> jax.Array:
    """``u * sigma`` in float32 or wider, in ``u``'s dtype; NaN and inf pass as they are.

    Mostly in lax primitives: a tree of thousands of small tensors traces this once for
    each, and ``jnp.where`` and ``jnp.isfinite`` (each a jit of its own) and NumPy-style
    promotion were most of its Python time."""
    wide = jnp.promote_types(u.dtype, jnp.float32)
    x = lax.convert_element_type(u, wide)
    s = lax.convert_element_type(sigma, wide)  # (a complex tensor's: sigma + 0j, as jnp's)
    if s.shape != x.shape:
        s = lax.broadcast_in_dim(s, x.shape, ())
    out = lax.mul(x, s)
    finite = jnp.isfinite(x) if jnp.iscomplexobj(x) else lax.is_finite(x)
    return lax.convert_element_type(lax.select(finite, out, x), u.dtype)


def _path_str(path: Any) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def clippy(
    lambda_rel: Threshold = 0.1,
    lambda_abs: Threshold = 1e-7,
    *,
    axis_name: AxisName = None,
    partition_specs: Any = None,
    error_if_nonfinite: bool = False,
) -> optax.GradientTransformation:
    """Clippy: shrinks each tensor's update so that no coordinate moves too far.

    From Tang, Wang, Yi, et al., *Improving Training Stability for Multitask
    Ranking Models in Recommender Systems*, KDD 2023
    (https://arxiv.org/abs/2302.09178). For every tensor ``w`` with update
    ``u`` (the step the optimizer is about to apply, learning rate included),
    the whole tensor's update is multiplied by one factor::

        sigma = min(1, min_j (lambda_rel * |w_j| + lambda_abs) / |u_j|)

    so that ``|sigma * u_j| <= lambda_rel * |w_j| + lambda_abs`` for every
    coordinate, and the tensor's update keeps its direction.

    **Place it after the optimizer**, where the updates are the steps that
    will be added to the parameters::

        tx = optax.chain(optax.adam(1e-3), optclip.clippy(0.1, 1e-7))

    Every optclip clipper placed after the optimizer clips the update in the
    same way: ``optax.chain(optax.adam(lr), optclip.clip_by_block_rms(1.0))``
    is Adafactor's update clipping (Levanter's ``update_rms_clipping``), and
    ``optclip.zclip`` after the optimizer watches the update norm for spikes.
    Clippy differs in bounding each coordinate by its own weight, so it needs
    ``params``.

    Anchored on TensorFlow Recommenders' ``ClippyAdagrad``
    (``tensorflow_recommenders/experimental/optimizers/clippy_adagrad.py``),
    whose defaults (``variable_relative_threshold=0.1``,
    ``absolute_threshold=1e-7``) are the defaults here, and whose edge cases
    are kept:

    * a coordinate whose update is 0 sets no bound (a zero update, or a zero
      tensor, gets ``sigma = 1``, never NaN);
    * a zero weight with ``lambda_abs = 0`` allows no move: any non-zero
      update of that tensor gives ``sigma = 0``, and the tensor stays put.

    Where optclip differs from the reference, on purpose:

    * **The Adagrad-accumulator term is left out.** ``ClippyAdagrad`` adds
      ``accumulator_relative_threshold / sqrt(accumulator + eps)`` to the
      bound, and can feed the clipping factor back into its accumulator
      (``clip_accumulator_update``). A transformation placed after an
      arbitrary optimizer sees only the updates and the parameters, not the
      optimizer's internal state, so neither can be done here. With the
      reference's default ``accumulator_relative_threshold=0.0`` the bound is
      the same. ``optax.chain(optax.adagrad(lr), clippy())`` is still not
      ``ClippyAdagrad`` step for step: Optax's Adagrad adds the current
      gradient to the accumulator before the step, as classical Adagrad does
      (the reference's ``use_standard_accumulator_update=True``).
    * The ratio is computed in float32 (float64 for float64 leaves); the
      output keeps each leaf's dtype.
    * NaN and inf update elements are not turned into plausible values: they
      pass through as they are, ``sigma`` is taken over the finite elements,
      and the stats flag the step (wrap the optimizer in
      :func:`optclip.skip_nonfinite` to skip it). A NaN *parameter* whose update is
      finite and non-zero makes its tensor's factor, and so its update, NaN (on every
      backend, and across devices).
    * ``lambda_rel = inf`` times a zero weight counts as 0, not NaN.

    Thresholds that a schedule or a traced array makes negative or NaN at run
    time zero the whole update (as a bound of 0 would) and set the stats'
    ``invalid_threshold``; they never flip its sign or let it through.

    Integer, boolean and ``float0`` leaves, and ``None`` leaves, pass through
    untouched.

    Args:
      lambda_rel: the largest move of a coordinate, as a fraction of its
        weight's magnitude: a float >= 0, a JAX scalar, or an Optax schedule
        of the step count. The reference's default is 0.1.
      lambda_abs: the move always allowed, whatever the weight, so that zero
        weights can leave 0: a float >= 0, a JAX scalar or a schedule.
        ``inf`` never clips.
      axis_name: inside ``shard_map`` or ``pmap``, the mesh axes along which
        every float leaf is split: each tensor's factor is the minimum across
        them, so every shard of a tensor is scaled alike (a leaf that is in
        fact replicated gets the same factor anyway; only the stats' norm
        would count it once per device: use ``partition_specs`` for mixed
        layouts).
      partition_specs: inside ``shard_map``, the ``PartitionSpec`` of every
        leaf (None for replicated ones); see :func:`optclip.global_norm`.
        Wins over ``axis_name``.
      error_if_nonfinite: raise ``FloatingPointError`` (through
        ``jax.debug.callback``) when the updates hold NaN or inf.

    Returns:
      An ``optax.GradientTransformation`` with a :class:`ClippyState`. Its
      ``update`` needs ``params`` of the updates' structure and shapes. The
      stats hold the global L2 norm of the incoming update as ``grad_norm``,
      ``lambda_rel`` as the threshold, the ratio of the global norms after
      and before as the scale, and whether any tensor's factor was below 1.

    Raises:
      ValueError: at construction, for a negative or NaN ``lambda_rel`` or
        ``lambda_abs``; at update time, when ``params`` are missing or do not
        match the updates' structure and shapes.

    Example:
      >>> import jax.numpy as jnp, optax, optclip
      >>> tx = optclip.clippy(lambda_rel=0.1, lambda_abs=0.0)
      >>> w = {"w": jnp.array([1.0, 10.0])}
      >>> u, state = tx.update({"w": jnp.array([0.5, 0.5])}, tx.init(w), w)
      >>> u["w"]  # coordinate 0 may move by 0.1 only: sigma = 0.2
      Array([0.1, 0.1], dtype=float32)
      >>> bool(state.stats.clipped)
      True
    """
    check_threshold("lambda_rel", lambda_rel)
    check_threshold("lambda_abs", lambda_abs)

    def init_fn(params: Any) -> ClippyState:
        del params
        return ClippyState(count=jnp.zeros((), jnp.int32), stats=ClipStats.zeros())

    def update_fn(updates: Any, state: ClippyState, params: Any = None
                  ) -> tuple[Any, ClippyState]:
        check_state(state, ClippyState, "clippy")
        if params is None:
            raise ValueError(
                "optclip.clippy bounds each update by its parameter's magnitude and needs "
                "params: call tx.update(updates, state, params)."
            )
        # None updates are leaves here, so that their params (array or None) are not checked.
        paths_flat, treedef = jax.tree_util.tree_flatten_with_path(
            updates, is_leaf=lambda x: x is None)
        try:
            pflat = treedef.flatten_up_to(params)
        except (ValueError, TypeError) as e:
            raise ValueError(
                "optclip.clippy: params must have the structure of the updates (pass the "
                f"params the updates belong to): {e}"
            ) from None
        flat = [x for _, x in paths_flat]
        idx = [i for i, x in enumerate(flat) if _n.is_float_leaf(x)]
        us = [jnp.asarray(flat[i]) for i in idx]
        ws = []
        for i in idx:
            w = pflat[i]
            if w is None or jnp.shape(w) != jnp.shape(flat[i]):
                got = "is None" if w is None else f"has shape {jnp.shape(w)}"
                raise ValueError(
                    f"optclip.clippy: params at {_path_str(paths_flat[i][0])} {got}, but its "
                    f"update has shape {jnp.shape(flat[i])}: pass the params the updates "
                    "belong to."
                )
            ws.append(jnp.asarray(w))

        # in the ratios' dtype: float64 leaves compare against float64 thresholds
        wide = _n.acc_dtype(us)  # float32 for none
        lam_rel = resolve(lambda_rel, state.count, wide, name="lambda_rel")
        lam_abs = resolve(lambda_abs, state.count, wide, name="lambda_abs")
        # `~(x >= 0)` is True for negative values and for NaN. Either one invalid makes the
        # whole bound 0: every non-zero update gets sigma = 0, never a negative factor.
        invalid = ~(lam_rel >= 0) | ~(lam_abs >= 0)
        zero = jnp.zeros((), jnp.float32)
        lr = jnp.where(invalid, zero, lam_rel)
        la = jnp.where(invalid, zero, lam_abs)

        if not us:
            stats = state.stats.advance(grad_norm=zero, threshold=f32(lam_rel),
                                        scale=jnp.ones((), jnp.float32), clipped=False,
                                        nonfinite=False, invalid_threshold=invalid)
            return updates, ClippyState(count=increment(state.count), stats=stats)

        axes = _n.leaf_axes(updates, axis_name, partition_specs)
        pieces = _pieces(us, ws, axes)
        acc = _n.acc_dtype(us)
        # factors and norms per unit of the pieces, from one pass. The norms only feed the
        # stats: never split per tensor. Both are in the pieces' order, which the stats need
        # no other than; zero-size tensors are in no piece (norm 0, factor 1: nothing to the
        # stats).
        sig_v, norms_v, nonfinite, own = _factors_and_norms(pieces, lr, la, acc)
        maybe_raise_nonfinite(error_if_nonfinite, nonfinite, "clippy")
        order = [j for js in pieces.leaves for j in js]
        sig_lay = _n.layout_of([jax.ShapeDtypeStruct((), acc)] * len(order), [None] * len(order))
        sigmas: list[Any] = [jnp.ones((), acc)] * len(us)
        for j, s in zip(order, _n.split_flat(sig_v, sig_lay,
                                             full=[us[j].shape for j in order]),
                        strict=True):
            sigmas[j] = s
        for js, s in zip(pieces.leaves, own, strict=True):
            if s is not None:  # a large tensor, one piece of its own
                sigmas[js[0]] = lax.reshape(s, ())

        out = list(flat)
        for j, i in enumerate(idx):
            out[i] = _apply(us[j], sigmas[j])
        before = _n.combine_norms(norms_v, 2.0)
        after = _n.combine_norms(mul0(norms_v, sig_v), 2.0)
        pos = before > 0
        ratio = jnp.where(pos, after / jnp.where(pos, before, 1), 1)
        stats = state.stats.advance(grad_norm=f32(before), threshold=f32(lam_rel),
                                    scale=f32(ratio), clipped=jnp.any(sig_v < 1),
                                    nonfinite=nonfinite, invalid_threshold=invalid)
        return (jax.tree_util.tree_unflatten(treedef, out),
                ClippyState(count=increment(state.count), stats=stats))

    return transformation(init_fn, update_fn, raises=error_if_nonfinite)
