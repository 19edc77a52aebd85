"""Scanned (stacked) layers: the ``layer_axis`` argument of the per-leaf clippers.

A model that scans over its layers (``nnx.scan``, ``nn.scan``, MaxText,
Levanter) holds the L layers' kernels as one leaf of shape ``(L, ...)`` (or
``(..., L, ...)``: MaxText scans over axis 1). ``layer_axis`` tells
:func:`optclip.clip_by_leaf_norm`, :func:`optclip.clip_by_block_rms`,
:func:`optclip.agc`, :func:`optclip.adagc` and :func:`optclip.leaf_norms` which
axis that is, so that each slice along it is treated as a separate layer. It
can be:

* ``None``: no leaf is stacked (the default);
* an ``int``: the layer axis of every leaf with more than one dimension
  (vectors and scalars are not stacked); negative values count from the end;
* a pytree prefix of the updates with ``int`` or ``None`` leaves: an ``int``
  applies, as above, to the leaves of more than one dimension beneath it;
* a callable ``(path, leaf) -> int | None``, called for each float leaf with
  its path as ``jax.tree_util.tree_flatten_with_path`` gives it; it decides
  alone (it may stack 1-D leaves, each element then being one layer).

The layer axis is static: under ``optax.inject_hyperparams`` name it in
``static_args=("layer_axis",)`` (an ``int`` would otherwise become an array,
and a callable would be taken for a schedule).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optclip import norms as _n

__all__ = ["LayerAxis", "check_layer_axis", "resolve_layer_axes"]

LayerAxis = Any  # None | int | a pytree prefix of int/None | Callable[[path, leaf], int | None]

_INTS = (int, np.integer)


def _is_int(x: Any) -> bool:
    return isinstance(x, _INTS) and not isinstance(x, bool)


def _static_hint(what: str) -> str:
    return (
        f"{what} must be a Python int, None, a pytree prefix of them, or a callable "
        "(path, leaf) -> int | None. Under optax.inject_hyperparams, name it in "
        "static_args=('layer_axis',)."
    )


def check_layer_axis(layer_axis: LayerAxis) -> None:
    """Validates what can be validated of ``layer_axis`` without the tree.

    Raises:
      ValueError: for an array, a bool, a float, or a prefix with a leaf that is
        not an ``int`` or ``None`` (the message gives its path in the prefix).
    """
    if layer_axis is None or _is_int(layer_axis):
        return
    if isinstance(layer_axis, (jax.Array, jax.core.Tracer, np.ndarray)):
        raise ValueError(_static_hint(f"layer_axis got an array ({layer_axis!r}); it"))
    if isinstance(layer_axis, (bool, float, complex, str, bytes)):
        raise ValueError(_static_hint(f"layer_axis got {layer_axis!r}; it"))
    if callable(layer_axis):
        return
    leaves = jax.tree_util.tree_flatten_with_path(layer_axis, is_leaf=lambda x: x is None)[0]
    for path, v in leaves:
        if v is not None and not _is_int(v):
            raise ValueError(_static_hint(
                f"layer_axis{jax.tree_util.keystr(path)} is {v!r}; every leaf of a layer_axis "
                "prefix"))


def _check_axis(a: Any, ndim: int, path: Any, how: str) -> int:
    where = jax.tree_util.keystr(path) or "the root"
    if not _is_int(a):
        raise ValueError(f"layer_axis ({how}) gave {a!r} for the leaf at {where}; "
                         "it must give an int or None.")
    if not -ndim <= a < ndim:
        raise ValueError(
            f"layer_axis {a} is out of range for the leaf at {where}, which has {ndim} "
            f"dimension(s); give that leaf None (a pytree prefix or a callable layer_axis "
            "can tell stacked leaves from the others).")
    return int(a) % ndim


def resolve_layer_axes(layer_axis: LayerAxis, tree: Any) -> list[int | None] | None:
    """Per float leaf of ``tree`` (in ``jax.tree.leaves`` order), its layer axis as an
    int >= 0, or None for a leaf that is not stacked; None when ``layer_axis`` is None.

    Raises:
      ValueError: for an invalid ``layer_axis``, a prefix that does not match
        the tree, or an axis out of range for a leaf (the message names its
        path).
    """
    if layer_axis is None:
        return None
    check_layer_axis(layer_axis)
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if _is_int(layer_axis) or callable(layer_axis):
        given = [layer_axis] * len(with_path)
    else:
        pre_leaves, pre_def = jax.tree_util.tree_flatten(layer_axis, is_leaf=lambda x: x is None)
        try:
            subtrees = pre_def.flatten_up_to(jax.tree_util.tree_unflatten(
                treedef, [object()] * len(with_path)))
        except (ValueError, TypeError) as e:
            raise ValueError(
                "layer_axis, as a pytree, must be a prefix of the updates' structure (the same "
                f"containers down to some depth, with an int or None at each end): {e}"
            ) from None
        given = []
        for v, sub in zip(pre_leaves, subtrees, strict=True):
            given += [v] * len(jax.tree_util.tree_leaves(sub))
    out: list[int | None] = []
    for (path, x), a in zip(with_path, given, strict=True):
        if not _n.is_float_leaf(x):
            continue
        ndim = jnp.ndim(x)
        if callable(a) and not _is_int(a):
            a = a(path, x)
            if a is None:
                out.append(None)
                continue
            if ndim == 0:
                where = jax.tree_util.keystr(path) or "the root"
                raise ValueError(f"layer_axis gave {a!r} for the scalar leaf at {where}; a "
                                 "scalar has no layer axis (give it None).")
            out.append(_check_axis(a, ndim, path, "a callable"))
        elif a is None or ndim <= 1:
            out.append(None)
        else:
            out.append(_check_axis(a, ndim, path, "an int"))
    return out


def reduce_axes(xs: Sequence[Any], las: Sequence[int | None] | None) -> list[Any]:
    """Per array, the axes a per-layer norm reduces: all but the layer axis (None: all)."""
    if las is None:
        return [None] * len(xs)
    return [None if la is None else tuple(d for d in range(jnp.ndim(x)) if d != la)
            for x, la in zip(xs, las, strict=True)]


def unit_axes(x: Any, la: int | None, axis: Any = None) -> Any:
    """AGC's reduced axes for one array whose layer axis is ``la``: Flax's unit rules (or the
    explicit ``axis``, for per-layer shapes of 2 or more dims) applied to the per-layer shape
    (the array's shape without the layer axis), mapped back to the stacked array's axes. The
    layer axis itself is never reduced."""
    ndim = jnp.ndim(x)
    if la is None:
        return _n.unitwise_axes(x, axis if ndim >= 2 else None)
    per = ndim - 1
    ax = _n.unitwise_axes(jnp.zeros((1,) * per), axis if per >= 2 else None)
    if ax is None:
        ax = range(per)
    else:
        ax = sorted({a % per for a in ax})
    return tuple(d if d < la else d + 1 for d in ax)


class LayerNorms(NamedTuple):
    """Per-layer norms of a list of arrays, with what is needed to scale them back."""

    norms: jax.Array  # [n_units]: every layer's norm (all layers, on every device)
    sizes: jax.Array  # [n_units]: the number of elements of each layer (all shards)
    nonfinite: jax.Array  # bool []: a NaN or inf element anywhere
    # a [n_units] vector -> per array, each part broadcasting against its array (at its
    # full shape, or keepdims)
    split: Callable[[jax.Array], list[jax.Array]]


def _names(ax: Any) -> tuple[Hashable, ...]:
    return _n.union_axes([ax])


def layer_norms(
    xs: list[jax.Array],
    p: float,
    las: Sequence[int | None] | None,
    tree: Any,
    *,
    axis_name: Any = None,
    partition_specs: Any = None,
) -> LayerNorms:
    """The p-norm of every layer of every array (one per unstacked array), overflow-safe.

    Inside ``shard_map``, a layer's partial norm is combined across the mesh
    axes that split its other dims. When the layer axis itself is split
    (pipeline style, named in ``partition_specs``), each device holds the
    norms of its own layers only: those are gathered, so that every device
    sees every layer (for the stats and for state such as AdaGC's, which is
    replicated), and ``split`` hands each device back its own layers' part.
    """
    axes = reduce_axes(xs, las)
    mesh = _n.leaf_axes(tree, axis_name, partition_specs, reduce_axes=axes)
    if partition_specs is not None and las is not None and any(a is not None for a in las):
        layer_mesh = _n.leaf_axes(tree, None, partition_specs,
                                  reduce_axes=[() if a is None else (a,) for a in las])
    else:
        layer_mesh = [None] * len(xs)
    flag_axes = _n.union_axes(layer_mesh)
    flat, nonfinite = _n.norm_core(xs, p, axes=axes, axes_per_leaf=mesh, flag_axes=flag_axes,
                                   flat=True)
    lay = _n.layout_of(xs, axes)
    # split's parts only scale their arrays: at their full shape where that is cheaper
    split_parts = functools.partial(_n.split_flat, lay=lay, full=[x.shape for x in xs])
    split_across = any(_names(ax) for ax in mesh or ())
    if not flag_axes and not split_across:
        # no array split across devices: every size is known here, one constant (a scalar
        # per array, stacked, was much of the trace time of a tree of many leaves)
        unit_sizes = jnp.asarray(np.repeat(np.asarray(lay.sizes, np.float64),
                                           np.asarray(lay.n_units, np.int64)), flat.dtype)
        return LayerNorms(flat, unit_sizes, nonfinite, split_parts)
    sizes = _n.collect([jnp.asarray(s, flat.dtype) for s in lay.sizes], mesh, lax.psum)
    if not flag_axes:
        unit_sizes = jnp.repeat(jnp.stack(sizes), np.asarray(lay.n_units),
                                total_repeat_length=lay.total)
        return LayerNorms(flat, unit_sizes, nonfinite, split_parts)
    # Every layer's norm on every device, in one psum across the mesh axes that split a
    # layer axis: each device writes its own layers' norms at their place (zeros elsewhere),
    # and the first device along the other axes writes the norms of the leaves those axes do
    # not split (which every device there holds alike). Exact, NaN and inf included.
    pieces, size_pieces, offsets, off = [], [], [], 0
    for i, (o, k) in enumerate(zip(lay.offsets, lay.n_units, strict=True)):
        seg = flat[o:o + k]
        own = _names(layer_mesh[i])
        rest = tuple(a for a in flag_axes if a not in own)
        n = int(np.prod([lax.axis_size(a) for a in own], dtype=np.int64))
        if own:
            seg = lax.dynamic_update_slice(jnp.zeros((n * k,), seg.dtype), seg,
                                           (_n.linear_index(own) * k,))
        if rest:
            seg = jnp.where(_n.linear_index(rest) == 0, seg, jnp.zeros_like(seg))
        pieces.append(seg)
        size_pieces.append(jnp.broadcast_to(sizes[i], seg.shape))
        offsets.append(off)
        off += seg.shape[0]
    norms = lax.psum(jnp.concatenate(pieces), flag_axes)
    unit_sizes = jnp.concatenate(size_pieces)

    def split(v: jax.Array) -> list[jax.Array]:
        out = []
        for i, (k, shape) in enumerate(zip(lay.n_units, lay.shapes, strict=True)):
            start = offsets[i]
            if layer_mesh[i] is None:
                part = v[start:start + k]
            else:
                part = lax.dynamic_slice(v, (start + _n.linear_index(_names(layer_mesh[i])) * k,),
                                         (k,))
            out.append(part.reshape(shape))
        return out

    return LayerNorms(norms, unit_sizes, nonfinite, split)
