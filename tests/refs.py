"""Independent NumPy references, written from the papers' formulas.

Everything here runs in float64 NumPy on host copies of the inputs; nothing
calls optclip.
"""

from __future__ import annotations

import math

import numpy as np


def np_leaves(tree_leaves):
    """Float leaves as float64 (complex: modulus) NumPy arrays."""
    out = []
    for x in tree_leaves:
        a = np.asarray(x)
        if a.dtype.kind == "c":
            out.append(np.abs(a.astype(np.complex128)))
        elif a.dtype.kind == "f" or str(a.dtype) == "bfloat16":
            out.append(np.asarray(a, np.float64))
    return out


def pnorm(arrays, p):
    flat = np.concatenate([np.abs(a).ravel() for a in arrays]) if arrays else np.zeros(0)
    if flat.size == 0:
        return 0.0
    if p == math.inf:
        return float(flat.max())
    m = flat.max()
    if m == 0:
        return 0.0
    return float(m * np.sum((flat / m) ** p) ** (1.0 / p))


def global_clip(arrays, max_norm, p=2.0, min_norm=None):
    """Pascanu et al. 2013: g <- g * min(1, max_norm / ||g||)."""
    g = pnorm(arrays, p)
    scale = 1.0
    if g > max_norm:
        scale = max_norm / g
    elif min_norm is not None and 0 < g < min_norm:
        scale = min_norm / g
    return [a * scale for a in arrays], g, scale


def leaf_clip(arrays, max_norm, p=2.0):
    out = []
    for a in arrays:
        n = pnorm([a], p)
        out.append(a * (max_norm / n) if n > max_norm else a)
    return out


def block_rms_clip(arrays, threshold):
    out = []
    for a in arrays:
        rms = pnorm([a], 2.0) / math.sqrt(max(a.size, 1))
        out.append(a * (threshold / rms) if rms > threshold else a)
    return out


def unit_norms(a, axes):
    """Euclidean norm over ``axes`` (None: all), keepdims."""
    return np.sqrt(np.sum(np.square(a), axis=axes, keepdims=axes is not None))


def agc_clip(g, w, clipping, eps, axes):
    """Brock et al. 2021, eq. 3: g_i <- clipping * max(||w_i||, eps) / ||g_i|| * g_i if larger."""
    wn = np.maximum(unit_norms(w, axes), eps)
    gn = unit_norms(g, axes)
    max_n = clipping * wn
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(gn > max_n, max_n / np.where(gn > 0, gn, 1), 1.0)
    return g * factor
