"""Tree norms: global p-norms, per-leaf norms and AGC's unit-wise norms.

Every norm here is *overflow-safe*: it accumulates in float32 (float64 when
a leaf is float64) and, when the fast accumulation of ``|x|**p`` overflows or
underflows, recomputes it scaled by the largest magnitude, so that a finite
fp16, bf16 or float32 input always gives its true, finite norm. The rescaled
path sits behind ``lax.cond`` and runs only on such steps: one cond for a global
norm; for per-unit norms, one for the max (also taken when a unit is all zeros,
whose sum of 0 looks like an underflow) and one for the rescaled sum (taken only
when a unit that is not all zeros needs it).

A caller that reduces the same arrays for something else in the same pass takes
their L2 norm without a second pass or a cond instead: :func:`blue_terms` splits
``|x|**2`` into three scaled sums (Blue 1978) that one variadic reduction can take
beside its own result, and :func:`blue_norm` combines them (:func:`optclip.clippy`).

Conventions shared by every function in this module:

* ``None`` leaves are not leaves in JAX and are skipped.
* Integer, boolean and ``float0`` leaves carry no gradient and are ignored:
  they contribute nothing to a norm (``leaf_norms`` gives them 0).
* Complex leaves use the modulus ``|z|``.
* ``axis_name`` (a mesh axis name or a tuple of them, valid inside
  ``shard_map`` or ``pmap``) combines the partial norms across that axis:
  a ``psum`` of the p-th powers for finite p, a ``pmax`` for ``ord=inf``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["global_norm", "leaf_norms", "unitwise_norm", "unitwise_axes"]

PyTree = Any
AxisName = Hashable | tuple[Hashable, ...] | None
Ord = Any  # 1, 2, math.inf, 'inf' or any real p >= 1


class _DefaultOrd:
    """The default ``ord``: 2, as an object that is not an ``int``.

    ``optax.inject_hyperparams`` turns every numeric argument, defaults
    included, into a traced array; ``ord`` decides the shape of the
    computation and must stay static, so its default is not numeric.
    """

    def __repr__(self) -> str:
        return "2"


L2 = _DefaultOrd()


def check_ord(ord: Ord) -> float:
    """Returns ``ord`` as a float p >= 1 (``math.inf`` for the max norm).

    Raises:
      ValueError: if ``ord`` is not 1, 2, ``inf`` or a real number >= 1.
    """
    if isinstance(ord, _DefaultOrd):
        return 2.0
    if isinstance(ord, (jax.Array, jax.core.Tracer)):
        raise ValueError(
            "ord must be a Python number, not an array. Under optax.inject_hyperparams, "
            "name it in static_args: optax.inject_hyperparams(optclip.clip_by_global_norm, "
            "static_args=('ord',))."
        )
    if isinstance(ord, str) and ord.lower() in ("inf", "max"):
        return math.inf
    if isinstance(ord, bool) or not isinstance(ord, (int, float, np.integer, np.floating)):
        raise ValueError(
            f"ord must be a real number p >= 1 (1, 2, math.inf, or any p such as 3.5); "
            f"got {ord!r} of type {type(ord).__name__}."
        )
    p = float(ord)
    if math.isnan(p) or p < 1:
        raise ValueError(f"ord must be a real number p >= 1 (1, 2, math.inf, ...); got {ord!r}.")
    return p


def is_float_leaf(x: Any) -> bool:
    """True for a leaf that carries a gradient: a real or complex float array."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return isinstance(x, (float, complex))
    return jnp.issubdtype(dtype, jnp.inexact)


def float_leaves(tree: PyTree) -> list[jax.Array]:
    """The float (real or complex) leaves of ``tree``, as arrays."""
    return [jnp.asarray(x) for x in jax.tree_util.tree_leaves(tree) if is_float_leaf(x)]


def acc_dtype(xs: Sequence[Any]) -> jnp.dtype:
    """float64 when any leaf is 64-bit, else float32."""
    for x in xs:
        if jnp.dtype(x.dtype) in (jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128)):
            return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def _magnitude(x: jax.Array, acc: jnp.dtype) -> jax.Array:
    """``x`` in ``acc`` for the norms' terms: a complex array's modulus (:func:`abs_in`), a
    real one as it is (its terms take ``|x|``)."""
    if jnp.iscomplexobj(x):
        return abs_in(x, acc)
    return x.astype(acc)


def abs_in(x: jax.Array, acc: Any) -> jax.Array:
    """``|x|`` in ``acc``, for an array of any dtype (complex: the modulus; unsigned and bool:
    their value), in lax primitives: cheap to trace for each of a model's tensors, where
    ``jnp.abs(x).astype(acc)`` is two jitted functions (and ``lax.abs`` alone rejects
    unsigned and bool arrays)."""
    if jnp.iscomplexobj(x):
        return lax.convert_element_type(lax.abs(x), acc)
    return lax.abs(lax.convert_element_type(x, acc))


def _pow_terms(m: jax.Array, p: float) -> jax.Array:
    """``|m| ** p`` element-wise."""
    if p == 2:
        return m * m
    if p == 1:
        return jnp.abs(m)
    return _abs_pow(m, p)


def _scaled_terms(v: jax.Array, scale: jax.Array, p: float) -> jax.Array:
    """``|v * scale| ** p`` for the overflow rescue; for p = 2, formed so that XLA
    cannot regroup it as ``scale**2 * v**2``.

    With ``v`` known at compile time (a constant tree under ``jit``), XLA's simplifier
    rewrites ``(v * c) * (v * c)`` as ``(v * v) * (c * c)``: for ``v = 1e20`` and ``c =
    2^-66`` that is inf times a subnormal flushed to 0, which is NaN, where the scaled terms
    themselves are all near 1. ``v`` and ``c`` go through one optimization barrier, which
    hides both from the simplifier: a barrier on ``v`` alone did not do for units of one
    element, whose scale folds to a constant too. A barrier on the product ``v * c`` did,
    but XLA:GPU then wrote the product out: the rescue branch held a temporary the size of
    the largest leaf (154 MB on GPT-2 on an H200: ``gn`` at 2f30d35 in
    ``bench/results/h200_2f30d35/gn_probe_1.log``). Two other forms were tried:
    ``|v * c| ** 2`` is simplified back to the product, and ``t * |t|`` made XLA:CPU write
    the scaled tree out (ResNet-50's global-norm chain: temp 3% -> 100%).
    """
    if p != 2:
        return _pow_terms(v * scale, p)
    v, scale = lax.optimization_barrier((v, scale))
    t = v * scale
    return t * t


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _abs_pow(m: jax.Array, p: float) -> jax.Array:
    """``|m| ** p``, whose derivative ``p |m| ** (p - 1)`` is held to the largest finite float.

    The plain sum of powers is computed for every step, and the rescaled one only when it
    overflows; on such a step the plain sum's cotangent is 0 and its derivative, for p > 2,
    inf: 0 * inf would make the whole gradient NaN. Wherever the plain sum is the one used,
    its terms are finite and so is their derivative: holding it to the largest float
    changes nothing there.
    """
    return jnp.abs(m) ** p


@_abs_pow.defjvp
def _abs_pow_jvp(p, primals, tangents):
    (m,), (tm,) = primals, tangents
    a = jnp.abs(m)
    big = jnp.asarray(jnp.finfo(a.dtype).max, a.dtype)
    coef = jnp.minimum(p * a ** (p - 1), big) * jnp.sign(m)
    return a ** p, coef * tm


# Leaves up to this many elements are reduced together rather than one by one: XLA:CPU's
# compile time grows much faster than linearly in the number of separate reductions, while
# a concatenation of small leaves compiles in linear time (and usually fuses, with no copy).
SMALL_LEAF = 1 << 16
# A unit-wise reduction is laid out as rows through a transposed copy: only arrays up to
# this many elements are, so that the copies stay a small part of a model's bytes.
SMALL_UNITS = 1 << 12


def own_copies(x: Any, n: int) -> list[Any]:
    """``n`` copies of the scalar ``x`` that XLA keeps apart (None: ``n`` Nones).

    A scalar that scales several arrays of one shape is broadcast once and the broadcast
    shared; XLA:CPU then writes that broadcast out in full (it does not fuse a shared
    broadcast into its reduce kernels). An optimization barrier gives each array its own.
    """
    if x is None or n <= 1:
        return [x] * n
    return list(lax.optimization_barrier((x,) * n))


def grouped_total(vals: list[jax.Array], scale: Any, term, red) -> jax.Array:
    """``red(term(v, scale))`` over every element of every array: large arrays one by one,
    the small ones concatenated first (raw, so that the concatenation has plain operands)."""
    large = [v for v in vals if v.size > SMALL_LEAF]
    small = [v.ravel() for v in vals if 0 < v.size <= SMALL_LEAF]
    scales = own_copies(scale, len(large) + 1)
    big = [red(term(v, sc)) for v, sc in zip(large, scales[:-1], strict=True)]
    if small:
        flat = small[0] if len(small) == 1 else jnp.concatenate(small)
        big.append(red(term(flat, scales[-1])))
    if not big:
        return jnp.zeros((), vals[0].dtype)
    return red(jnp.stack(big)) if len(big) > 1 else big[0]


def _reduced_dims(ax: Any, ndim: int) -> tuple[int, ...]:
    """The dims an axis spec (an int or a sequence of them, negative allowed) reduces,
    sorted."""
    return tuple(sorted({a % ndim for a in ((ax,) if isinstance(ax, int) else ax)}))


def _rows(v: jax.Array, ax: Any) -> tuple[jax.Array, tuple[int, ...], list[int], tuple]:
    """``v`` as a matrix with one row per unit (the reduced dims flattened into each row),
    with the shape of the keepdims result and the permutation that puts the kept dims first."""
    if ax is None:
        return v.reshape(1, -1), (), list(range(v.ndim)), ()
    red = list(_reduced_dims(ax, v.ndim))
    keep = [d for d in range(v.ndim) if d not in red]
    perm = keep + red
    n_units = int(np.prod([v.shape[d] for d in keep], dtype=np.int64))
    width = int(np.prod([v.shape[d] for d in red], dtype=np.int64))
    out_shape = tuple(1 if d in red else v.shape[d] for d in range(v.ndim))
    rows = jnp.transpose(v, perm).reshape(n_units, width) if perm != list(range(v.ndim)) \
        else v.reshape(n_units, width)
    return rows, out_shape, perm, tuple(red)


def _bucket(width: int) -> int:
    """The padded row width of a bucket: the next power of two (at most 2x the data)."""
    return 1 << max(0, (width - 1).bit_length())


class Layout(NamedTuple):
    """Where each array's results sit in the flat vector of per-unit results."""

    offsets: tuple[int, ...]  # the first unit of each array
    n_units: tuple[int, ...]  # 1 for a whole-array reduction
    shapes: tuple[tuple[int, ...], ...]  # each array's result: () or its keepdims shape
    sizes: tuple[int, ...]  # the number of elements reduced into each unit
    total: int


def layout_of(vals: Sequence[Any], axes: Sequence[Any]) -> Layout:
    offsets, n_units, shapes, sizes = [], [], [], []
    off = 0
    for v, ax in zip(vals, axes, strict=True):
        shape = tuple(jnp.shape(v))
        if ax is None:
            k, out, size = 1, (), int(np.prod(shape, dtype=np.int64))
        else:
            red = _reduced_dims(ax, len(shape))
            out = tuple(1 if d in red else n for d, n in enumerate(shape))
            k = int(np.prod(out, dtype=np.int64))
            size = int(np.prod([shape[d] for d in red], dtype=np.int64))
        offsets.append(off)
        n_units.append(k)
        shapes.append(out)
        sizes.append(size)
        off += k
    return Layout(tuple(offsets), tuple(n_units), tuple(shapes), tuple(sizes), off)


def _units(flat: jax.Array, lay: Layout, j: int, gather: bool) -> jax.Array:
    """Array ``j``'s part of the flat vector of per-unit results (scalar or keepdims shape).

    By a slice, or with ``gather`` by a gather whose indices are a constant array. XLA:CPU
    compiles every distinct kernel on its own, at several milliseconds each, and reuses a
    kernel only for identical ones. A slice's offset is part of its kernel, and XLA fuses
    the slice, and the element-wise work on the vector before it, into the kernel that uses
    it: every array got kernels of its own (a tree of 1,000 leaves spent seconds compiling
    nothing but the slices, and GPT-2's per-leaf chain had 239 distinct kernels, the
    global-norm chain 84: ``python -m bench.compile_probe``). A constant array of indices
    is an operand of the kernel instead, not part of it (XLA:CPU fuses scalar constants
    only), so the kernels are the same for every array with the same number of units and
    shape. One index more than the units, dropped after the gather, keeps a one-unit
    array's indices from being a single value, which XLA turns back into a slice (the extra
    index is not the unit's own: ``[o, o]`` XLA folded into a broadcast constant, fused, a
    kernel per array again).
    """
    o, k, shape = lay.offsets[j], lay.n_units[j], lay.shapes[j]
    # lax primitives, not NumPy-style indexing, whose own Python work (and index
    # normalisation) was most of a per-leaf clipper's trace time on many leaves
    # (bench/results/cpu_trace/); XLA's optimized program is the same.
    if not gather or k == 0:
        return lax.reshape(lax.slice(flat, (o,), (o + k,)), shape)
    return _unit_gather(flat, o, k, lay.total, shape)


def _unit_gather(flat: jax.Array, o: int, k: int, total: int,
                 shape: tuple[int, ...]) -> jax.Array:
    """Units ``[o, o + k)`` of ``flat`` (``total`` of them), by a gather (see :func:`_units`),
    in ``shape``."""
    idx = np.append(np.arange(o, o + k), 0 if o else total - 1).astype(np.int32)
    got = lax.gather(flat, idx[:, None], _GATHER_DIMS, (1,),
                     mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)
    return lax.reshape(lax.slice(got, (0,), (k,)), shape)


# one element of a 1-D array per index (as ``v.at[idx].get()``)
_GATHER_DIMS = lax.GatherDimensionNumbers(offset_dims=(), collapsed_slice_dims=(0,),
                                          start_index_map=(0,))


def _split_sliced(flat: jax.Array, lay: Layout,
                  full: Sequence[tuple[int, ...]] | None = None) -> list[jax.Array]:
    """Each array's part of ``flat`` (as :func:`_units` without ``gather``), and with
    ``full`` those of :func:`_at_full` broadcast to their arrays' shapes.

    By one ``lax.split``, which lowers to the same slices: one equation where a slice each
    took 1,000 on 1,000 leaves, and ``split_flat`` traces this branch on every platform.
    A part whose units lie along one dim of its array is broadcast as it comes, without a
    reshape to its keepdims shape first (bench/results/cpu_split_trace/)."""
    at_full = set(_at_full(lay, full))
    if hasattr(lax, "split") and lay.offsets:
        parts = lax.split(flat, lay.n_units)
    else:  # (lax.split: JAX 0.4.38 on)
        parts = [lax.slice(flat, (o,), (o + k,)) for o, k in zip(lay.offsets, lay.n_units,
                                                                   strict=True)]
    out = []
    for j, (p, shape) in enumerate(zip(parts, lay.shapes, strict=True)):
        if j in at_full:
            # the one dim the units lie along (for a single unit the last, whose size 1
            # broadcasts to any)
            along = [d for d, n in enumerate(shape) if n > 1]
            if len(along) <= 1:
                d = along[0] if along else len(full[j]) - 1
                out.append(lax.broadcast_in_dim(p, full[j], (d,)))
                continue
            p = lax.reshape(p, shape)
            out.append(lax.broadcast_in_dim(p, full[j], tuple(range(p.ndim))))
        else:
            out.append(p if p.shape == shape else lax.reshape(p, shape))
    return out


def _split_gathered(flat: jax.Array, lay: Layout,
                    full: Sequence[tuple[int, ...]] | None) -> list[jax.Array]:
    """:func:`split_flat` on XLA:CPU: each array's part by a gather (:func:`_units`) from the
    vector written out first (:func:`_written_out`), or, for an array of ``full`` shape of 2
    to ``FULL_GATHER`` elements, by a gather of its own shape (:func:`_parts_at`)."""
    at_full = _at_full(lay, full)
    dups = [j for j in at_full if lay.n_units[j] == 1]
    if dups:
        # one more copy of each such array's single unit, at ``total + r``: its index then
        # holds two values, which XLA does not fold into a broadcast (see _full_index)
        flat = jnp.concatenate([flat, flat[np.array([lay.offsets[j] for j in dups])]])
    w = _written_out(flat)
    dup_at = {j: lay.total + r for r, j in enumerate(dups)}
    parts = _parts_at(w, tuple((lay.offsets[j], lay.n_units[j], lay.shapes[j], full[j],
                                dup_at.get(j), lay.total) for j in at_full)) \
        if at_full else ()
    got = dict(zip(at_full, parts, strict=True))
    return [got[j] if j in got else _units(w, lay, j, True) for j in range(len(lay.offsets))]


# On XLA:CPU an array of at most this many elements takes its part of a per-unit vector at
# its own shape (:func:`_full_index`): its index is a constant of 4 bytes an element, read
# with the array. (int32: an int16 index, half the bytes, aborted XLA's SPMD partitioner
# under jit with NamedSharding, "Unsupported indices type: S16".)
FULL_GATHER = 1 << 12


def _at_full(lay: Layout, full: Sequence[tuple[int, ...]] | None) -> list[int]:
    """The arrays whose part :func:`split_flat` hands back at their own shape ``full[j]``:
    those with units and 2 to ``FULL_GATHER`` elements."""
    if full is None:
        return []
    return [j for j, shape in enumerate(full)
            if lay.n_units[j] and 2 <= int(np.prod(shape, dtype=np.int64)) <= FULL_GATHER]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _parts_at(w: jax.Array, specs: tuple) -> tuple[jax.Array, ...]:
    """For each ``(o, k, unit_shape, shape, dup, total)`` of ``specs``: units ``[o, o + k)`` of
    ``w`` (of keepdims ``unit_shape``) broadcast to ``shape``, by a gather of one element per
    element (:func:`_full_index`; ``dup`` a copy of a single unit at the end of ``w``,
    ``total`` where the copies start).

    Its tangent is each part's units gathered as they are and broadcast (as :func:`_units`),
    whose transpose sums each unit's cotangents by a reduction: the gather's own transpose,
    a scatter-add, adds up to ``FULL_GATHER`` of them into one unit one after another
    (gradients through ``clippy`` 6x further from float64, found in review). One
    ``custom_jvp`` for all the parts: one for each doubled the trace time of 1,000 leaves.
    """
    out = []
    for o, k, unit_shape, shape, dup, _ in specs:
        idx = _full_index(o, k, unit_shape, shape, dup)
        out.append(lax.gather(w, idx[..., None], _GATHER_DIMS, (1,),
                              mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS))
    return tuple(out)


@_parts_at.defjvp
def _parts_at_jvp(specs, primals, tangents):
    (w,), (t,) = primals, tangents
    tans = []
    for o, k, unit_shape, shape, _, total in specs:
        units = _unit_gather(t, o, k, total, unit_shape)
        tans.append(lax.broadcast_in_dim(units, shape, tuple(range(units.ndim))))
    return _parts_at(w, specs), tuple(tans)


def _full_index(o: int, k: int, unit_shape: tuple[int, ...], shape: tuple[int, ...],
                dup: int | None) -> np.ndarray:
    """The index into the per-unit vector of every element of an array of ``shape`` whose
    units are ``[o, o + k)`` (of keepdims ``unit_shape``): its unit's, so that the gather is
    the part broadcast to the array's shape.

    A gather of the units alone, broadcast in the kernel that multiplies the array by them,
    is a kernel of its own: XLA does not fuse a gather into a consumer that reads each of
    its elements many times. A gather of one element per element of the array it fuses, and
    the array then takes one kernel rather than two, the same kernel for every array of its
    shape (its index is an operand: XLA:CPU fuses scalar constants only). On 1,000 small
    leaves, ``agc``'s update alone had 2,017 kernels, and 1,101 with it (``python -m
    bench.compile_probe --alone``; in a chain the multiply was already in the optimizer's
    kernel, and the counts hardly move). An index of one value throughout XLA folds into a
    broadcast constant, fused, a kernel per array again: an array of one unit has its last
    element read the unit's copy at ``dup``.
    """
    units = np.arange(o, o + k, dtype=np.int32).reshape(unit_shape)
    idx = np.array(np.broadcast_to(units, shape), np.int32)
    if k == 1:
        idx.flat[-1] = dup
    return idx


def _written_out(v: jax.Array) -> jax.Array:
    """``v``, which XLA:CPU then computes once and writes out, rather than inside every
    kernel that takes a part of it.

    XLA fuses cheap element-wise work into each of its consumers. A per-leaf clipper's
    factors (adagc's EMA, warm-up and clip rule, say) were computed again inside each
    leaf's gather kernel, 57 instructions in each, and compile time grew with them (1,000
    such leaves: 7.74 s, against 1.73 s written out; ``python -m bench.xla_probe
    written_out``). A ``lax.cond`` is a boundary XLA does not fuse across; its predicate,
    ``x == x or x != x`` of one element, is always true (NaN included), but XLA does not
    fold it, and the other branch is never taken.
    """
    if v.size == 0:
        return v
    x0 = v.ravel()[0]
    return lax.cond((x0 == x0) | (x0 != x0), lambda a: a, lambda a: -a, v)


def split_flat(flat: jax.Array, lay: Layout,
               full: Sequence[tuple[int, ...]] | None = None) -> list[jax.Array]:
    """The flat vector of per-unit results, as one array per input (scalar or keepdims).

    On XLA:CPU each array takes its part by a gather (:func:`_units`), so that arrays of one
    shape share their kernels, from the vector written out first (:func:`_written_out`);
    elsewhere by slices, which XLA:GPU and XLA:TPU fuse into the kernel that uses them.

    ``full``: the arrays' own shapes, for parts that only broadcast against their arrays
    (clip factors): on XLA:CPU a small array's part then comes at its full shape, which the
    kernel that scales the array takes in (:func:`_full_index`).
    """
    if not jnp.issubdtype(flat.dtype, jnp.floating):
        return _split_sliced(flat, lay)
    full = None if full is None else [tuple(s) for s in full]

    # (the branches' types must agree: the parts the CPU's takes at full shape, the other
    # broadcasts, as the kernel that scales the array would broadcast them)
    return lax.platform_dependent(flat, cpu=lambda v: _split_gathered(v, lay, full),
                                  default=lambda v: _split_sliced(v, lay, full))


class _Packed(NamedTuple):
    """Arrays laid out for per-unit reductions (:func:`_pack`): each piece is
    ``(kind, ids, array, info)``, ``ids`` the units it yields, in order."""

    pieces: tuple
    lay: Layout
    alone: tuple[int, ...]  # the arrays reduced on their own


def _pack(vals: list[jax.Array], axes: list[Any], lay: Layout, mag) -> _Packed:
    """The arrays of a per-unit reduction, laid out once for every reduction of them.

    Small arrays are not reduced one by one: XLA's compile time grows with the number of
    separate reductions, and a model can have thousands of small leaves. Small arrays of
    one shape, reduced over the same dims, are stacked and reduced together, with no copy
    but the stack. A small array whose shape no other has is laid out as rows, one per
    unit (a unit-wise reduction transposes the reduced dims last, a copy: only for arrays
    up to ``SMALL_UNITS`` elements); rows of similar width are zero-padded to a
    power-of-two width and stacked, and each stack is reduced in one op (zeros add nothing
    to a sum of powers, nor to a max of magnitudes). The stacks and rows hold ``mag`` of
    the small arrays (one dtype, whatever theirs). Larger arrays are reduced on their own,
    and kept as they are: ``mag`` of a large array is computed inside each reduction of it,
    never written out.

    The layout is built once and shared by the norm's reductions: the rescue's two
    ``lax.cond`` branches, which laid the arrays out again, each with its own stacks,
    spent compile time on them (``agc``'s update alone on 1,000 small leaves: 8.50 s,
    6.45 s with one layout; ``bench/results/cpu_packed``).
    """
    pieces: list[tuple] = []
    buckets: dict[int, list[tuple[jax.Array, np.ndarray]]] = {}
    alone = tuple(j for j, (v, ax) in enumerate(zip(vals, axes, strict=True))
                  if v.size > SMALL_LEAF or (ax is not None and v.size > SMALL_UNITS))
    # small arrays of one shape, reduced over the same dims, are stacked and reduced together
    same: dict[tuple, list[int]] = {}
    for j, (v, ax) in enumerate(zip(vals, axes, strict=True)):
        if lay.n_units[j] and v.size and j not in alone:
            red_dims = None if ax is None else _reduced_dims(ax, v.ndim)
            same.setdefault((tuple(v.shape), red_dims), []).append(j)
    stacked = {js[0]: (key, js) for key, js in same.items() if len(js) > 1}
    grouped = {j for _, js in stacked.values() for j in js}
    for j, (v, ax, off, k) in enumerate(zip(vals, axes, lay.offsets, lay.n_units,
                                            strict=True)):
        ids = np.arange(off, off + k)
        if k == 0:
            continue
        if v.size == 0:
            pieces.append(("empty", ids, None, None))
        elif j in alone:
            pieces.append(("alone", ids, v, (j, ax)))
        elif j in stacked:
            # No padding and no transposed copy: a stack of arrays of one shape is reduced
            # over the same dims, shifted by the stacking axis. Units come out in the order
            # of the layout (each array's kept dims, row-major).
            (shape, red_dims), js = stacked[j]
            mat = jnp.stack([mag(vals[i]) for i in js])
            dims = tuple(range(1, len(shape) + 1)) if red_dims is None else \
                tuple(d + 1 for d in red_dims)
            ids = np.concatenate([np.arange(lay.offsets[i], lay.offsets[i] + k) for i in js])
            unit_shape = (len(js),) + (lay.shapes[j] if red_dims is not None
                                       else (1,) * len(shape))
            pieces.append(("stack", ids, mat, (dims, unit_shape)))
        elif j not in grouped:
            rows = _rows(mag(v), ax)[0]
            buckets.setdefault(_bucket(rows.shape[1]), []).append((rows, ids))
    for width, items in buckets.items():
        mats = [jnp.pad(r, ((0, 0), (0, width - r.shape[1]))) if r.shape[1] < width else r
                for r, _ in items]
        mat = mats[0] if len(mats) == 1 else jnp.concatenate(mats, axis=0)
        pieces.append(("rows", np.concatenate([i for _, i in items]), mat, None))
    return _Packed(tuple(pieces), lay, alone)


def _reduce_packed(packed: _Packed, scales: Any, term, red, dtype: Any, mag) -> jax.Array:
    """``red(term(m, scale))`` of every unit of the packed arrays (:func:`_pack`), ``m`` the
    magnitudes (``mag`` of an array reduced on its own), as one flat vector in layout order.
    ``scales`` is None or a flat vector with one scale per unit (or a tuple of such vectors,
    handed to ``term`` together)."""
    lay = packed.lay
    own: dict[int, jax.Array] = {}
    if scales is not None and packed.alone:
        # Each array reduced on its own gets its own part of the scales (a gather on
        # XLA:CPU, as in ``split_flat``), through one optimization barrier: slices of one
        # shared vector let XLA:GPU fuse the terms of every array of one shape into one
        # multi-output kernel, whose outputs (each the size of its array) it then writes
        # out for the reductions.
        def pick(sc, gather):
            return tuple(jax.tree.map(lambda v, j=j: _units(v, lay, j, gather), sc)
                         for j in packed.alone)
        sl = lax.platform_dependent(scales, cpu=lambda s: pick(s, True),
                                    default=lambda s: pick(s, False))
        own = dict(zip(packed.alone, lax.optimization_barrier(sl), strict=True))
    pieces: list[jax.Array] = []
    index: list[np.ndarray] = []
    for kind, ids, v, info in packed.pieces:
        if kind == "empty":
            pieces.append(jnp.zeros((ids.size,), dtype))
        elif kind == "alone":
            j, ax = info
            pieces.append(jnp.ravel(red(term(mag(v), own.get(j)), axis=ax,
                                        keepdims=ax is not None)))
        elif kind == "stack":
            dims, unit_shape = info
            sc = None if scales is None else jax.tree.map(
                lambda s, ids=ids, us=unit_shape: s[ids].reshape(us), scales)
            pieces.append(jnp.ravel(red(term(v, sc), axis=dims)))
        else:
            sc = None if scales is None else jax.tree.map(lambda s, ids=ids: s[ids][:, None],
                                                          scales)
            pieces.append(red(term(v, sc), axis=1))
        index.append(ids)
    if not pieces:
        return jnp.zeros((lay.total,), dtype)
    flat = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)
    order = np.concatenate(index)
    if not np.array_equal(order, np.arange(lay.total)):
        flat = flat[np.argsort(order)]
    return flat


class _Collected(NamedTuple):
    """:func:`_pack_collect`'s result: the arrays packed in groups that share their mesh
    axes."""

    # (mesh axes, the units of the layout it yields (None: one group, all of them), packed)
    groups: tuple[tuple[Any, np.ndarray | None, _Packed], ...]
    total: int


def _pack_collect(vals: list[jax.Array], axes: list[Any], lay: Layout,
                  axes_per_leaf: Sequence[AxisName] | None, mag) -> _Collected:
    """The arrays packed (:func:`_pack`) in groups that share their mesh axes (None:
    replicated).

    Arrays are reduced and combined in groups, and the groups' results are concatenated
    only then: inside ``shard_map`` a vector is typed as varying across every mesh axis
    that any of its parts varies across, so a combined part written into a vector that
    also holds uncombined ones would still be typed as varying, and a state built from it
    could not leave with ``out_specs=P()``.
    """
    mesh = [None] * len(vals) if axes_per_leaf is None else \
        [None if ax == () else ax for ax in axes_per_leaf]
    groups: dict[Any, list[int]] = {}
    for i, ax in enumerate(mesh):
        groups.setdefault(ax, []).append(i)
    if len(groups) == 1:
        ax = next(iter(groups))
        return _Collected(((ax, None, _pack(vals, axes, lay, mag)),), lay.total)
    out = []
    for ax, ids in groups.items():
        sub_vals, sub_axes = [vals[i] for i in ids], [axes[i] for i in ids]
        units = np.concatenate([np.arange(lay.offsets[i], lay.offsets[i] + lay.n_units[i])
                                for i in ids]).astype(np.int64)
        out.append((ax, units, _pack(sub_vals, sub_axes, layout_of(sub_vals, sub_axes), mag)))
    return _Collected(tuple(out), lay.total)


def _reduce_collect(coll: _Collected, scales: Any, term, red, op, dtype: Any,
                    mag) -> jax.Array:
    """:func:`_reduce_packed` of each group of :func:`_pack_collect`, each group's units
    combined across its own mesh axes, in layout order."""
    pieces, index = [], []
    for ax, units, packed in coll.groups:
        sc = scales if scales is None or units is None else jax.tree.map(
            lambda v, u=units: v[u], scales)
        part = _reduce_packed(packed, sc, term, red, dtype, mag)
        part = part if ax is None else op(part, ax)
        if units is None:
            return part
        pieces.append(part)
        index.append(units)
    flat = jnp.concatenate(pieces)
    order = np.concatenate(index)
    if not np.array_equal(order, np.arange(coll.total)):
        flat = flat[np.argsort(order)]
    return flat


def linear_index(names: tuple[Hashable, ...]) -> jax.Array:
    """This device's position along the mesh axes ``names`` taken together (major to minor),
    as a ``PartitionSpec`` entry ``("a", "b")`` orders the blocks."""
    idx = jnp.zeros((), jnp.int32)
    for name in names:
        idx = idx * lax.axis_size(name) + lax.axis_index(name)
    return idx


def replicate(x: jax.Array, axes: tuple[Hashable, ...]) -> jax.Array:
    """``x``, equal on every device across mesh ``axes``, typed as such inside ``shard_map``.

    The first device's value is summed with zeros from the others: exact for every value,
    NaN and inf included (a ``pmax`` might drop a NaN). Without axes, ``x`` itself.
    """
    if not axes:
        return x
    return lax.psum(jnp.where(linear_index(axes) == 0, x, jnp.zeros_like(x)), axes)


def safe_root(s: jax.Array, p: float) -> jax.Array:
    """``s ** (1/p)`` with a finite derivative at ``s == 0`` (NaN stays NaN)."""
    zero = s == 0
    safe = jnp.where(zero, jnp.ones_like(s), s)
    if p == 1:
        root = safe
    elif p == 2:
        root = jnp.sqrt(safe)
    else:
        root = safe ** (1.0 / p)
    return jnp.where(zero, jnp.zeros_like(s), root)


def _pow2_scale(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Powers of two ``(down, up)`` that bring ``m`` into [2, 4) (into [1, 2) in the lowest
    binade of normal numbers) and back.

    Scaling by a power of two is exact. The target [2, 4), rather than
    [1, 2), keeps ``down`` a normal number even for ``m`` near the largest
    float: a subnormal factor would be flushed to zero by XLA on CPU. Both
    are 1 where ``m`` is 0 or not finite. Built from the exponent bits: a
    handful of integer ops, cheap to compile even when a tree has thousands
    of leaves (``frexp``/``ldexp`` made compile time explode).
    """
    info = jnp.finfo(m.dtype)
    nm = info.nmant
    bias = info.maxexp - 1
    itype = jnp.int64 if m.dtype == jnp.float64 else jnp.int32
    bits = lax.bitcast_convert_type(m, itype)
    e = (bits >> nm) & ((1 << info.nexp) - 1)  # the biased exponent: m in [2^(e-bias), ...)
    ok = ((e > 0) & (e < 2 * bias + 1) & (m > 0)).astype(itype)
    # In the lowest binade of normal numbers, [2, 4) would need ``up`` = 2^(emin - 1), a
    # subnormal (flushed to 0): bring m into [1, 2) there instead.
    low = (e == 1).astype(itype)
    # integer blends rather than selects: XLA compiles a select that feeds thousands of
    # per-leaf fusions very slowly
    down_e = ok * (2 * bias + 1 - e - low) + (1 - ok) * bias
    up_e = ok * (e - 1 + low) + (1 - ok) * bias
    down = lax.bitcast_convert_type(down_e.astype(itype) << nm, m.dtype)
    up = lax.bitcast_convert_type(up_e.astype(itype) << nm, m.dtype)
    return lax.stop_gradient(down), lax.stop_gradient(up)


def _reduce_size(x: jax.Array, axis: Any) -> int:
    if axis is None:
        return int(x.size)
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return int(np.prod([x.shape[a] for a in axes], dtype=np.int64))


def collect(parts: list[jax.Array], leaf_axes: Sequence[AxisName] | None, op) -> list[jax.Array]:
    """Combines each array's partial result across its own mesh axes (None: replicated).

    Arrays that share axes are combined in one collective.
    """
    if leaf_axes is None:
        return parts
    out = list(parts)
    groups: dict[Any, list[int]] = {}
    for i, ax in enumerate(leaf_axes):
        if ax is not None and ax != ():
            groups.setdefault(ax, []).append(i)
    for ax, ids in groups.items():
        reduced = op([parts[i] for i in ids], ax)
        for i, r in zip(ids, reduced, strict=True):
            out[i] = r
    return out


def union_axes(axes_per_leaf: Sequence[AxisName] | None) -> tuple[Hashable, ...]:
    """Every mesh axis named in ``axes_per_leaf``, once each, in order."""
    names: list[Hashable] = []
    for ax in axes_per_leaf or ():
        for name in (ax if isinstance(ax, tuple) else () if ax is None else (ax,)):
            if name not in names:
                names.append(name)
    return tuple(names)


def any_across(flag: jax.Array, axes: tuple[Hashable, ...]) -> jax.Array:
    """``flag`` OR-ed across mesh ``axes`` (unchanged when there are none)."""
    if not axes:
        return flag
    return lax.pmax(flag.astype(jnp.int32), axes) > 0


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def pmax(x: jax.Array, axes: Any) -> jax.Array:
    """``lax.pmax(x, axes)``, with the derivative of a max: JAX has none for a ``pmax``.

    The tangent is that of the devices' values equal to the max, split equally among those
    devices (a subgradient of the L-inf norm: on each device, ``jnp.max`` has split its own
    among its tied elements, so that ties spread unevenly across devices are not weighted
    as one ``jnp.max`` of all the elements would weight them).
    """
    return lax.pmax(x, axes)


@pmax.defjvp
def _pmax_jvp(axes, primals, tangents):
    (x,), (tx,) = primals, tangents
    y = pmax(x, axes)
    hit = x == y
    ties = lax.psum(hit.astype(tx.dtype), axes)
    ty = lax.psum(jnp.where(hit, tx, jnp.zeros_like(tx)), axes)
    return y, ty / jnp.maximum(ties, jnp.ones_like(ties))


def norm_across(norm: jax.Array, axes: tuple[Hashable, ...]) -> jax.Array:
    """The L2 combination of per-device L2 norms across mesh ``axes``, overflow-safe."""
    if not axes:
        return norm
    # (the max only picks the scale: held constant, as the rescue's is, since JAX has no
    # derivative of a pmax and the norm's does not depend on the scale)
    m = lax.pmax(lax.stop_gradient(norm), axes)
    down, up = _pow2_scale(m)
    s = lax.psum(_scaled_terms(norm, down, 2.0), axes)
    return jnp.where(m == 0, jnp.zeros_like(m), safe_root(s, 2.0) * up)


def _spec_axes(spec: Any, ndim: int, reduce_axes: Any) -> AxisName:
    """The mesh axes that split the reduced dims of an array laid out as ``spec``."""
    if spec is None:
        return None
    dims = range(ndim) if reduce_axes is None else reduce_axes
    names: list[Hashable] = []
    for d in dims:
        entry = spec[d] if d < len(spec) else None
        if entry is None:
            continue
        for name in (entry if isinstance(entry, tuple) else (entry,)):
            if name not in names:
                names.append(name)
    if not names:
        return None
    return names[0] if len(names) == 1 else tuple(names)


def leaf_axes(
    tree: Any,
    axis_name: AxisName = None,
    partition_specs: Any = None,
    reduce_axes: Sequence[Any] | None = None,
) -> list[AxisName] | None:
    """Per float leaf of ``tree``, the mesh axes across which its partial norms combine.

    Args:
      tree: the updates.
      axis_name: every float leaf is split along these axes.
      partition_specs: a pytree with the structure of ``tree`` whose leaves are
        ``PartitionSpec`` (or None for replicated leaves), as given to
        ``shard_map``'s ``in_specs``; a leaf is combined across the mesh axes
        that split the dims being reduced. Wins over ``axis_name``.
      reduce_axes: per float leaf, the reduced dims (None: all of them).
    """
    if partition_specs is None:
        if axis_name is None:
            return None
        n = sum(1 for x in jax.tree_util.tree_leaves(tree) if is_float_leaf(x))
        return [axis_name] * n
    from jax.sharding import PartitionSpec

    leaves, treedef = jax.tree_util.tree_flatten(tree)
    specs = jax.tree.map(lambda s: s, partition_specs,
                         is_leaf=lambda x: x is None or isinstance(x, PartitionSpec))
    try:
        flat_specs = treedef.flatten_up_to(
            jax.tree.map(lambda s: PartitionSpec() if s is None else s, specs,
                         is_leaf=lambda x: x is None or isinstance(x, PartitionSpec)))
    except (ValueError, TypeError) as e:
        raise ValueError(
            "partition_specs must have the structure of the updates, with a PartitionSpec "
            f"(or None) for every leaf: {e}"
        ) from None
    out = []
    j = 0
    for x, spec in zip(leaves, flat_specs, strict=True):
        if is_float_leaf(x):
            red = None if reduce_axes is None else reduce_axes[j]
            out.append(_spec_axes(spec, jnp.ndim(x), red))
            j += 1
    return out


def norm_core(
    xs: Sequence[jax.Array],
    p: float,
    *,
    axes: Sequence[Any] | None = None,
    combine: bool = False,
    axes_per_leaf: Sequence[AxisName] | None = None,
    flag_axes: tuple[Hashable, ...] = (),
    flat: bool = False,
    xform: Any = None,
    rescue: bool = True,
) -> tuple[Any, jax.Array]:
    """The one norm kernel behind every public norm and clipper.

    Args:
      xs: float arrays.
      p: the norm order, already checked by :func:`check_ord`.
      axes: per array, the axes to reduce (``None``: all of them). With an
        axis the result keeps its dims, so that it broadcasts against ``x``.
      combine: reduce all arrays into one global norm (``axes`` must be None).
      axes_per_leaf: per array, the mesh axes across which its partial norm is
        combined (None for a replicated array); see :func:`leaf_axes`.
      flag_axes: mesh axes across which the results may still differ (units
        split across devices); the overflow check and the non-finite flag are
        OR-ed across them, so that every device takes the same branch.
      flat: return the per-unit norms as one flat vector (see :func:`layout_of`)
        rather than one array per input.
      xform: an element-wise function applied to each array before its norm is
        taken (the norm of ``xform(x, i, for_max)``, ``i`` the array's index;
        ``for_max`` asks for the same values by another expression, for the
        rescue's max). It is applied inside the rescue's ``lax.cond`` branches
        (their max and their rescaled sum), whose operands are then the arrays themselves: a
        transformed tree handed in instead would be written out in full as the
        ``cond``'s operand.
      rescue: False when the caller knows that the terms can neither overflow nor lose
        precision as subnormals (``xform`` has scaled every element to at most 1, and one
        to 1): the sum is then taken once, with no overflow rescue and its ``lax.cond``.

    Returns:
      ``(norms, nonfinite)``: a list with one norm per array (one in all when
      ``combine``; a flat vector of every unit's norm with ``flat``), in the
      accumulation dtype, and a bool scalar that is True when any element of
      ``xs`` is NaN or infinite.

    The non-finite flag is always read from a *sum* (which propagates NaN and
    inf through every reduction and every ``psum``), never from a max: a
    cross-device max, as XLA inserts it for sharded arrays, may drop a NaN.
    """
    xs = list(xs)
    acc = acc_dtype(xs)
    if not xs:
        empty = jnp.zeros((0,), acc) if flat and not combine else [jnp.zeros((), acc)]
        return empty, jnp.zeros((), bool)
    axes = [None] * len(xs) if axes is None else list(axes)
    def mag(v: jax.Array) -> jax.Array:
        return _magnitude(v, acc)

    # The combined norm's magnitudes of its large arrays: built afresh by every reduction, so
    # that inside the rescue branch they are traced from ``xs`` (the cond's operands) rather
    # than captured, materialised, from outside. (Its small arrays are concatenated once, and
    # the per-unit norms' stacked once, below: a concatenation or a stack of many arrays is
    # written out anyway.) ``xform(x, i, for_max)``: the max's copy is written
    # differently, so that XLA does not merge it with the sum's into one producer of two
    # reductions, which it would write out.
    def mags_of(ids: Sequence[int], for_max: bool) -> list[jax.Array]:
        return [mag(xs[i] if xform is None else xform(xs[i], i, for_max)) for i in ids]

    mesh = [None] * len(xs) if axes_per_leaf is None else list(axes_per_leaf)
    # The combined norm's small arrays, per group of mesh axes: concatenated once, outside the
    # rescue's conds, which take the concatenation as it is. It is written out anyway (a
    # concatenation of many arrays is not fused into its reduction), and built in each of the
    # three reductions it cost compile time in proportion to the number of small leaves.
    # Without ``xform``, their magnitudes are concatenated, each taken in the accumulation
    # dtype first. With ``xform``, the arrays themselves (the transform is taken once, on the
    # concatenation, with its first array's index), of strong types: a weak float32 (the
    # gradient of a Python float) beside a float16 array would be cast to float16. And
    # complex arrays apart: a real one would gain imaginary zeros, which an ``xform`` that
    # clamps into bounds excluding 0 would move.
    small_flat: dict[Any, list[tuple[int, jax.Array]]] = {}
    if combine:
        kinds: dict[tuple, list[int]] = {}
        for i, ax in enumerate(mesh):
            if 0 < xs[i].size <= SMALL_LEAF:
                kinds.setdefault((ax, xform is not None and jnp.iscomplexobj(xs[i])),
                                 []).append(i)
        for (ax, _), ids in kinds.items():
            vals = [jnp.ravel(mag(xs[i]) if xform is None
                              else lax.convert_element_type(xs[i], xs[i].dtype)) for i in ids]
            small_flat.setdefault(ax, []).append(
                (ids[0], jnp.concatenate(vals) if len(vals) > 1 else vals[0]))

    def group_mags(ax: Any, ids: list[int], for_max: bool) -> list[jax.Array]:
        """The magnitudes of a group of arrays to be reduced together (those of mesh axes
        ``ax``): the large ones one by one, the small ones as flat arrays (``small_flat``):
        one by one, a model's thousand small leaves would each add their own op, and compile
        time grows with them."""
        out = mags_of([i for i in ids if xs[i].size > SMALL_LEAF], for_max)
        for first, flat in small_flat.get(ax, []):
            out.append(flat if xform is None else mag(xform(flat, first, for_max)))
        return out or [jnp.zeros((0,), acc)]
    lay = layout_of(xs, axes)
    # per unit: the arrays laid out once (stacks and rows of the small ones' magnitudes),
    # outside the rescue's conds, whose branches then take the layout as it is
    packed = None if combine else _pack_collect(xs, axes, lay, axes_per_leaf, mag)

    def finish(v: jax.Array) -> Any:
        return [v] if combine else (v if flat else split_flat(v, lay))

    def terms(kind: str):
        if kind == "sum":
            red = jnp.sum
            if p > 2:
                # sc = (down, t): |x * down / t| ** p, two steps that are each exact or normal
                term = lambda v, sc: _pow_terms(  # noqa: E731
                    v if sc is None else (v * sc[0]) / sc[1], p)
            else:
                term = lambda v, sc: _pow_terms(v, p) if sc is None else _scaled_terms(  # noqa: E731
                    v, sc, p)
        elif kind == "nan":
            red = jnp.sum
            term = lambda v, sc: jnp.abs(v) * 0  # noqa: E731
        elif kind == "max":
            # |x| >= 0, so 0 is the identity of the max, and empty arrays reduce to 0
            red = _max0
            term = lambda v, sc: jnp.abs(v)  # noqa: E731
        else:
            # "scale": the rescue's max, which only picks a scale. The norm is homogeneous
            # (c ||x / c|| = ||x|| for any c), so holding it constant leaves the gradient
            # exact, and no derivative of a cross-device max is needed (JAX has none).
            red = _max0
            term = lambda v, sc: jnp.abs(lax.stop_gradient(v))  # noqa: E731
        return red, (lax.psum if kind in ("sum", "nan") else pmax), term

    def reduce(kind: str, scale: Any = None) -> jax.Array:
        """Per unit (a flat vector; with ``combine``, one value in all): the sum of
        ``|x * scale| ** p`` (``|x * down / t| ** p`` for p > 2), the max of ``|x|``, or the
        sum of ``|x| * 0`` (NaN exactly when an element is NaN or infinite); combined
        across the mesh axes."""
        red, coll, term = terms(kind)
        if not combine:
            return _reduce_collect(packed, scale, term, red, coll, acc, mag)
        groups: dict[Any, list[int]] = {}
        for i, ax in enumerate(mesh):
            groups.setdefault(ax, []).append(i)
        parts = []
        for ax, ids in groups.items():
            part = grouped_total(group_mags(ax, ids, kind in ("max", "scale")), scale, term,
                                 red)
            parts.append(part if ax is None or ax == () else coll(part, ax))
        return red(jnp.stack(parts)) if len(parts) > 1 else parts[0]

    def any_nonfinite(v: jax.Array) -> jax.Array:
        return any_across(jnp.any(~jnp.isfinite(v)), flag_axes)

    if p == math.inf:
        ms = reduce("max")
        # NaN where an element is NaN or inf, even when a sharded max dropped the NaN
        poison = reduce("nan")
        ms = jnp.where(jnp.isnan(poison) & jnp.isfinite(ms), jnp.full_like(ms, jnp.nan), ms)
        return finish(ms), any_nonfinite(poison)

    parts = reduce("sum")
    if not rescue:
        return finish(safe_root(parts, p)), any_nonfinite(parts)
    if combine:
        sizes = np.array([sum(int(x.size) for x in xs)])
    else:
        sizes = np.repeat(np.array(lay.sizes, np.int64), lay.n_units)
    info = jnp.finfo(acc)
    # Below this, terms |x|**p may have lost precision as subnormals. (An empty array's sum is
    # an exact 0: it never needs the rescue.)
    lows = np.where(sizes > 0, float(info.tiny) / float(info.eps) * np.maximum(sizes, 1), 0.0)
    lows = lows.astype(acc).reshape(jnp.shape(parts))
    need_u = ~jnp.isfinite(parts) | (parts < lows)
    need = any_across(jnp.any(need_u), flag_axes)

    def fast() -> tuple[jax.Array, jax.Array]:
        # False here, but computed from the data so that inside shard_map its type
        # (which devices it may vary over) matches the rescue branch's flag.
        return safe_root(parts, p), any_nonfinite(parts)

    def rescaled(ms: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The rescue's second pass: the sum of every unit's terms brought near 1 by a
        power of two from its max ``ms``."""
        if p > 2:
            # Divide by the largest magnitude itself, so that every term is <= 1 and the
            # largest is 1, whatever p (a power of two in [2, 4) would overflow 4**p for
            # p > 64, and one in [0.5, 1) underflow 0.5**p for p > 126). In two steps: a
            # power of two brings x to [2, 4) times x / max, exactly, and then it is divided
            # by max times that power, in [1, 4): a plain x / max is taken by XLA as x times
            # 1 / max, a subnormal (flushed to 0) for a max above 2**126.
            ok = (ms > 0) & jnp.isfinite(ms)
            d, _ = _pow2_scale(ms)
            down = (d, jnp.where(ok, ms * d, jnp.ones_like(ms)))
            up = jnp.where(ok, ms, jnp.ones_like(ms))
        else:
            down, up = _pow2_scale(ms)
        s = reduce("sum", down)
        # A sum of finite terms brought to at most 4**p stays finite: a non-finite sum means
        # a NaN or inf element (one a sharded max may have dropped from ``ms``).
        norms = jnp.where((ms == 0) & jnp.isfinite(s), jnp.zeros_like(ms), safe_root(s, p) * up)
        return norms, any_nonfinite(s)

    if combine:
        # One total: it is 0 only when every array is (or holds only tiny values).
        norms, flag = lax.cond(need, lambda: rescaled(reduce("scale")), fast)
        return finish(norms), flag
    # An all-zero unit (a frozen or unused parameter, a dead channel) has a sum of 0, below its
    # ``lows``, and so asks for the rescue at every step. Its max shows that it is 0, and then
    # its fast sum stands: the rescue's second pass, over every array, is taken only when
    # some other unit asked for it (a NaN max is not 0: such a unit takes it; a NaN that a
    # sharded max dropped leaves the unit's fast sum NaN, so its norm stays NaN). Two conds
    # rather than one; both take the small arrays' stacks built once above (``packed``).
    ms = lax.cond(need, lambda: reduce("scale"), lambda: jnp.zeros_like(parts))
    again = any_across(jnp.any(need_u & ~(ms == 0)), flag_axes)
    norms, flag = lax.cond(again, lambda: rescaled(ms), fast)
    return finish(norms), flag


def _blue_consts(acc: Any) -> tuple[float, float, float, float]:
    """Blue's thresholds and scales for ``acc``: ``(t_small, t_big, s_small, s_big)``,
    powers of two. A magnitude below ``t_small`` is squared scaled up by ``s_small``, one
    above ``t_big`` scaled down by ``s_big``, the others as they are: every term is then a
    normal number (subnormal inputs included) and at most ``2 ** (maxexp - 40)``, so that
    no sum of fewer than ``2 ** 39`` terms overflows, and the largest terms are exact to
    the last bit."""
    info = jnp.finfo(acc)
    lo, hi = int(info.minexp), int(info.maxexp)  # the normal range [2**lo, 2**hi)
    head = (hi - 40) // 2  # terms up to 2 ** (2 * head) <= 2 ** (hi - 40)
    return (2.0 ** -((-lo) // 2), 2.0 ** head, 2.0 ** (head + (-lo) // 2),
            2.0 ** -(hi - head))


def blue_terms(x: jax.Array, acc: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``|x|**2`` element-wise as three accumulations of one pass (Blue, *A Portable Fortran
    Program to Find the Euclidean Norm of a Vector*, ACM TOMS 4(1), 1978; LAPACK's
    ``nrm2`` since 3.10): small magnitudes scaled up, large ones scaled down, the others as
    they are; each element is in exactly one of the three, the others hold 0.

    Summed (by plain sums, across devices too), :func:`blue_norm` gives the L2 norm with no
    overflow and no underflow, and with no second pass and no ``lax.cond``: a form that a
    variadic reduction can take beside another result. A NaN lands in the middle term and
    an inf in the large one, so that the norm is NaN or inf."""
    t_sml, t_big, s_sml, s_big = _blue_consts(acc)
    # (lax primitives: traced once per tensor, where jnp's functions cost trace time)
    a = abs_in(x, acc)
    zero = lax.full_like(a, 0)
    small, big = lax.lt(a, lax.full_like(a, t_sml)), lax.gt(a, lax.full_like(a, t_big))
    mid = lax.select(lax.bitwise_or(small, big), zero, a)
    lo = lax.select(small, lax.mul(a, lax.full_like(a, s_sml)), zero)
    hi = lax.select(big, lax.mul(a, lax.full_like(a, s_big)), zero)
    return lax.mul(lo, lo), lax.mul(mid, mid), lax.mul(hi, hi)


def blue_norm(sml: jax.Array, med: jax.Array, big: jax.Array) -> jax.Array:
    """The L2 norm from the sums of :func:`blue_terms` (element-wise over such sums).

    Its derivative is finite, but differentiated through :func:`blue_terms` the scales'
    factors (up to ``2**214`` for float32) underflow or overflow the cotangents of tiny or
    huge inputs (below about 1e-19, a derivative of 0): attach the norm's derivative by
    other means where it matters, as ``optclip.clippy`` does for its stats.
    """
    acc = med.dtype
    _, _, s_sml, s_big = _blue_consts(acc)
    c = lambda v: jnp.asarray(v, acc)  # noqa: E731
    # any large term: the middle ones, scaled down, count beside them (the small ones cannot)
    # (roots with a finite derivative at 0: an unselected root of 0 would make the stats'
    # gradient NaN)
    from_big = safe_root(big + (med * c(s_big)) * c(s_big), 2.0) * c(1 / s_big)
    # no large term: the middle and the small ones, combined as roots (a sum of squares
    # would flush the small ones as subnormals where they still count)
    y_med, y_sml = safe_root(med, 2.0), safe_root(sml, 2.0) * c(1 / s_sml)
    y_max, y_min = jnp.maximum(y_med, y_sml), jnp.minimum(y_med, y_sml)
    # (1 where the branch is not taken: a tiny y_max there made its derivative inf, and the
    # zero cotangent times inf NaN)
    safe = jnp.where((med > 0) & (y_max > 0), y_max, c(1))
    from_rest = y_max * jnp.sqrt(1 + jnp.square(y_min / safe))
    # NaN in any sum (a NaN element) stays NaN; an inf one (an inf element) makes it inf
    out = jnp.where(big > 0, from_big, jnp.where(med > 0, from_rest, y_sml))
    return jnp.where(jnp.isnan(sml + med + big), c(jnp.nan), out)


def _max0(x: jax.Array, axis: Any = None, keepdims: bool = False) -> jax.Array:
    """The max of non-negative values, 0 for an empty reduction."""
    return jnp.max(x, axis=axis, keepdims=keepdims, initial=jnp.zeros((), x.dtype))


def combine_norms(norms: jax.Array, p: float) -> jax.Array:
    """The p-norm of a vector of partial p-norms, overflow-safe (a small vector)."""
    if norms.size == 0:
        return jnp.zeros((), norms.dtype)
    if p == math.inf:
        return jnp.max(norms)
    m = jnp.max(norms)
    down, up = _pow2_scale(m)
    root = safe_root(jnp.sum(_scaled_terms(norms, down, p)), p)
    return jnp.where(m == 0, jnp.zeros_like(m), root * up)


def global_norm_and_flag(
    tree: PyTree, ord: Ord = 2, *, axis_name: AxisName = None, partition_specs: Any = None
) -> tuple[jax.Array, jax.Array]:
    """``(global_norm(tree, ord), nonfinite)`` from one pass over the leaves."""
    p = check_ord(ord)
    norms, nonfinite = norm_core(float_leaves(tree), p, combine=True,
                                 axes_per_leaf=leaf_axes(tree, axis_name, partition_specs))
    return norms[0], nonfinite


def compiles_eagerly(args: Any) -> bool:
    """True when a call on ``args`` may run a compiled program in place of op by op: not
    under ``jax.disable_jit()``, and every leaf of ``args`` a concrete JAX array: not a
    tracer (the call is then not inside ``jit``, ``grad``, ``vmap``, ``shard_map`` or
    ``pmap``), not a NumPy array or a Python number (which ``jit`` would convert: a NumPy
    int64 to int32), and not a ``float0`` array."""
    if jax.config.jax_disable_jit:
        return False
    for leaf in jax.tree.leaves(args):
        if isinstance(leaf, jax.core.Tracer) or not isinstance(leaf, jax.Array):
            return False
        if leaf.dtype == jax.dtypes.float0:
            return False
    return True


_COMPILED: dict = {}


def _compiled_when_eager(fn):
    """``fn(x, *args, **kwargs)`` compiled when called eagerly on JAX arrays: one program per
    set of the other (static) arguments, kept for the process. Op by op, JAX traced the
    overflow rescue's ``lax.cond`` again at every call and compiled it again (100 ms or more
    a call on XLA:CPU: a norm logged at every step of an eager loop paid it at every step).
    Runs as written under ``jit`` and the other transformations, under
    ``jax.disable_jit()``, when ``x`` holds anything but JAX arrays, and when an argument
    cannot be a key (an array ``ord``, which ``check_ord`` refuses, or a dict of partition
    specs)."""
    @functools.wraps(fn)
    def run(x, *args, **kwargs):
        if not compiles_eagerly(x):
            return fn(x, *args, **kwargs)
        # typed, so that ord=True (refused) is not ord=1, which equals it
        key = (fn.__name__, tuple((type(a), a) for a in args),
               tuple((k, type(v), v) for k, v in sorted(kwargs.items())))
        try:
            compiled = _COMPILED.get(key)
        except TypeError:
            return fn(x, *args, **kwargs)
        if compiled is None:
            compiled = _COMPILED[key] = jax.jit(lambda x: fn(x, *args, **kwargs))
        return compiled(x)

    return run


@_compiled_when_eager
def global_norm(
    tree: PyTree, ord: Ord = 2, *, axis_name: AxisName = None, partition_specs: Any = None
) -> jax.Array:
    """The p-norm of all the float leaves of a pytree taken together.

    Unlike ``optax.global_norm``, the sum of powers is accumulated in float32
    (float64 for float64 leaves) and rescaled when it would overflow, so a
    finite fp16 or bf16 tree gives its true norm, never ``inf``.

    Args:
      tree: a pytree of arrays. ``None``, integer and ``float0`` leaves are
        ignored; complex leaves use ``|z|``.
      ord: 1, 2, ``math.inf`` (or ``"inf"``), or any real p >= 1.
      axis_name: a mesh axis name, or a tuple of them, across which the
        partial norms of a tree sharded inside ``shard_map`` or ``pmap`` are
        combined: every float leaf is taken to be split along it. ``None``
        under plain ``jit`` (sharded or not): XLA then sees the whole arrays.
      partition_specs: for a tree of mixed layouts inside ``shard_map``, the
        ``PartitionSpec`` of every leaf (the ``in_specs`` you gave
        ``shard_map``; None or ``P()`` for replicated leaves). Each leaf's
        partial norm is combined across the mesh axes named in its spec, and
        a replicated leaf is counted once. Wins over ``axis_name``.

    Returns:
      A float32 scalar (float64 when a leaf is float64); 0 for an empty tree.

    Raises:
      ValueError: for an ``ord`` below 1 or not a number.

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> float(optclip.global_norm({"a": jnp.full((1000,), 300.0, jnp.float16)}))
      9486.83...
      >>> float(optclip.global_norm([jnp.array([3.0, -4.0])], ord=1))
      7.0
    """
    return global_norm_and_flag(tree, ord, axis_name=axis_name,
                                partition_specs=partition_specs)[0]


@_compiled_when_eager
def leaf_norms(
    tree: PyTree,
    ord: Ord = 2,
    *,
    axis_name: AxisName = None,
    partition_specs: Any = None,
    layer_axis: Any = None,
) -> PyTree:
    """The p-norm of each leaf on its own, as a pytree of scalars.

    This is the per-layer diagnostic: a leaf whose norm shrinks towards 0 over
    training while the others do not is the signature of vanishing gradients,
    which clipping does not fix.

    Args:
      tree: a pytree of arrays; integer and ``float0`` leaves give 0.
      ord: 1, 2, ``math.inf`` or any real p >= 1.
      axis_name: mesh axes across which every leaf's partial norm is combined
        (every leaf is taken to be sharded along it).
      partition_specs: per leaf, its ``PartitionSpec`` inside ``shard_map``
        (see :func:`global_norm`).
      layer_axis: for scanned (stacked) layers, the axis along which a leaf
        stacks L layers (an int, a pytree prefix or a callable; see
        :mod:`optclip.layers`): such a leaf gives a vector of L norms, one per
        layer. Inside ``shard_map`` with the layer axis split (named in
        ``partition_specs``), each device gets its own layers' norms.

    Returns:
      A pytree of the same structure whose leaves are float32 scalars (a
      ``(L,)`` vector for a stacked leaf).

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> optclip.leaf_norms({"w": jnp.array([3.0, 4.0]), "b": jnp.zeros(2)})
      {'b': Array(0., dtype=float32), 'w': Array(5., dtype=float32)}
    """
    from optclip import layers  # noqa: PLC0415 (layers builds on this module)

    p = check_ord(ord)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    idx = [i for i, x in enumerate(leaves) if is_float_leaf(x)]
    xs = [jnp.asarray(leaves[i]) for i in idx]
    las = layers.resolve_layer_axes(layer_axis, tree)
    axes = layers.reduce_axes(xs, las)
    mesh = leaf_axes(tree, axis_name, partition_specs, reduce_axes=axes)
    # with the layer axis split across devices, the per-layer norms differ across devices
    flag_axes = union_axes(leaf_axes(tree, axis_name, partition_specs)) if las else ()
    norms, _ = norm_core(xs, p, axes=axes, axes_per_leaf=mesh, flag_axes=flag_axes)
    out = [jnp.zeros((), jnp.float32)] * len(leaves)
    for i, n in zip(idx, norms, strict=False):
        out[i] = n.reshape(-1) if jnp.ndim(n) else n
    return jax.tree_util.tree_unflatten(treedef, out)


def unitwise_axes(x: Any, axis: int | Sequence[int] | None = None) -> tuple[int, ...] | None:
    """The axes that AGC reduces for one array, in Flax's layouts.

    Scalars and vectors (biases, scales) are one unit (``None``: all axes).
    A 2-D ``(in, out)`` kernel has one unit per output: axis 0. A conv kernel
    ``(..., in, out)`` has one unit per output channel: all axes but the last.
    An explicit ``axis`` wins.
    """
    if axis is not None:
        return (axis,) if isinstance(axis, int) else tuple(axis)
    ndim = jnp.ndim(x)
    if ndim <= 1:
        return None
    return tuple(range(ndim - 1))


@_compiled_when_eager
def unitwise_norm(x: jax.Array, axis: int | Sequence[int] | None = None) -> jax.Array:
    """The L2 norm of each unit of ``x``, as in AGC (Brock et al. 2021).

    Args:
      x: one array. For Flax's ``(in, out)`` Dense kernels the units are the
        output columns; for conv kernels ``(h, w, in, out)`` the output
        channels; a bias or a scalar is a single unit.
      axis: the axes to reduce instead of the default above.

    Returns:
      The unit norms with the reduced axes kept (size 1), so that the result
      broadcasts against ``x``; float32 (float64 for float64 input).

    Example:
      >>> import jax.numpy as jnp, optclip
      >>> optclip.unitwise_norm(jnp.array([[3.0, 0.0], [4.0, 1.0]]))
      Array([[5., 1.]], dtype=float32)
    """
    x = jnp.asarray(x)
    norms, _ = norm_core([x], 2.0, axes=[unitwise_axes(x, axis)])
    n = norms[0]
    return jnp.broadcast_to(n, (1,) * x.ndim) if x.ndim and n.ndim == 0 else n
