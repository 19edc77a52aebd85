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


def clippy_sigma(u, w, lam_rel, lam_abs):
    """Tang et al. 2023: a tensor's factor min(1, min_j (lam_rel |w_j| + lam_abs) / |u_j|)
    over its non-zero updates (1 when there are none)."""
    u = np.asarray(u, np.float64)
    w = np.asarray(w, np.float64)
    nz = u != 0
    if not nz.any():
        return 1.0
    bound = lam_rel * np.abs(w) + lam_abs
    return float(min(1.0, np.min(bound[nz] / np.abs(u[nz]))))


class ZClipRef:
    """ZClip (Kumar et al. 2025) from the paper's algorithm and the authors' reference code.

    Differences kept on purpose by optclip and mirrored here: scale = clip / g exactly
    (no + 1e-6), max_norm=None by default.
    """

    def __init__(self, alpha=0.97, z_thresh=2.5, warmup_steps=25, mode="zscore",
                 clip_option="adaptive_scaling", clip_factor=1.0, max_norm=None,
                 skip_update_on_spike=False, eps=1e-6):
        self.__dict__.update(locals())
        self.buffer, self.mean, self.var = [], None, None

    def step(self, g):
        """Returns the scale applied to a gradient of norm g."""
        if self.mean is None:
            self.buffer.append(g)
            if len(self.buffer) >= self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
            cap = self.max_norm
            return cap / g if cap is not None and g > cap else 1.0
        std = self.var**0.5
        clip_val = None
        if self.mode == "percentile":
            if g > self.mean + self.z_thresh * std:
                clip_val = self.mean + self.z_thresh * std
        else:
            z = (g - self.mean) / (std + self.eps)
            if z > self.z_thresh:
                if self.clip_option == "adaptive_scaling":
                    clip_val = self.clip_factor * (self.mean + self.z_thresh * std /
                                                   (z / self.z_thresh))
                else:
                    clip_val = self.mean
        eff = clip_val if clip_val is not None else g
        if self.max_norm is not None:
            eff = min(eff, self.max_norm)
        scale = eff / g if g > eff else 1.0
        if not (clip_val is not None and self.skip_update_on_spike):
            v = clip_val if clip_val is not None else g
            self.mean = self.alpha * self.mean + (1 - self.alpha) * v
            self.var = self.alpha * self.var + (1 - self.alpha) * (v - self.mean) ** 2
        return scale


def adagc_ref(norm_seq, lambda_rel=1.05, beta=0.98, warmup_steps=100, lambda_abs=1.0):
    """AdaGC (Wang et al. 2025) on a sequence of per-tensor norm vectors: the scales h_t."""
    gamma = None
    out = []
    for t, norms in enumerate(norm_seq):
        norms = np.asarray(norms, np.float64)
        if t < warmup_steps:
            g = np.sqrt(np.sum(norms**2))
            h = np.full_like(norms, min(lambda_abs / g, 1.0) if g > 0 else 1.0)
            clipped = h * norms
            gamma = clipped if gamma is None else np.minimum(gamma, clipped)
        else:
            thr = lambda_rel * gamma
            with np.errstate(divide="ignore", invalid="ignore"):
                h = np.where(norms > thr, thr / np.where(norms > 0, norms, 1), 1.0)
            gamma = beta * gamma + (1 - beta) * h * norms
        out.append(h)
    return out


def skip_on_spike_ref(norm_seq, z_thresh=4.0, alpha=0.97, warmup_steps=25, eps=1e-6):
    """The guard's decisions: True where a step is skipped."""
    buf, mean, var, out = [], None, None, []
    for g in norm_seq:
        if not np.isfinite(g):
            out.append(True)
            continue
        if mean is None:
            buf.append(g)
            if len(buf) >= warmup_steps:
                mean = np.mean(buf)
                var = np.var(buf)
            out.append(False)
            continue
        std = np.sqrt(var)
        spike = (g - mean) / (std + eps) > z_thresh
        v = mean + z_thresh * (std + eps) if spike else g
        mean = alpha * mean + (1 - alpha) * v
        var = alpha * var + (1 - alpha) * (v - mean) ** 2
        out.append(bool(spike))
    return out
