"""Matplotlib figures for training histories and gradient fields.

Matplotlib is imported inside each function, so ``import optclip`` never
needs it; install it with ``pip install "optclip[examples]"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["aggregate_history", "plot_training", "plot_training_details", "plot_divergence_sweep",
           "plot_gradient_field", "plot_lm_spikes", "descend"]

History = Mapping[str, Mapping[str, Any]]
"""``{method: {"loss": [seeds, steps], "grad_norm": [seeds, steps], "clipped": [seeds, steps],
"layers": {name: [seeds, steps]}}}``: what the RNN demo records with ``optclip.stats``."""


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, path: Any, title: str | None, dpi: int = 72):
    if title:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


def _colours(names: Sequence[str]) -> dict[str, Any]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _cut(y: np.ndarray, stops: Sequence[int | None] | None) -> np.ndarray:
    """Rows as float, NaN from each row's stop (its divergence step) on."""
    y = np.array(y, np.float64)
    y = np.where(np.isfinite(y), y, np.nan)
    for i, stop in enumerate(stops or []):
        if stop is not None:
            y[i, stop + 1:] = np.nan
    return y


def _nan_reduce(fn, y: np.ndarray, axis: int = 0) -> np.ndarray:
    import warnings

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(y, axis=axis)


def _rolling(x: np.ndarray, w: int, log: bool = False) -> np.ndarray:
    """A trailing rolling mean over the finite values of each window.

    NaN where the window holds no finite value, and NaN wherever ``x`` itself
    is NaN, so a run that has stopped stays stopped. With ``log``, the window
    at step t is ``min(w, 1 + t // 8)`` steps, as suits a log step axis (the
    first steps are not averaged with later ones).
    """
    x = np.asarray(x, np.float64)
    if w <= 1:
        return x.copy()
    ok = np.isfinite(x)
    v = np.where(ok, x, 0.0)
    pad = [(0, 0)] * (x.ndim - 1) + [(1, 0)]
    cs = np.cumsum(np.pad(v, pad), axis=-1)
    cn = np.cumsum(np.pad(ok.astype(np.float64), pad), axis=-1)
    n = x.shape[-1]
    width = np.minimum(w, 1 + np.arange(n) // 8) if log else w
    lo = np.maximum(np.arange(1, n + 1) - width, 0)
    hi = np.arange(1, n + 1)
    s = cs[..., hi] - cs[..., lo]
    c = cn[..., hi] - cn[..., lo]
    with np.errstate(all="ignore"):
        out = np.where(c > 0, s / np.where(c > 0, c, 1), np.nan)
    return np.where(ok, out, np.nan)


def aggregate_history(
    run: Mapping[str, Any],
    stops: Sequence[int | None] | None = None,
    *,
    window: int = 50,
    smooth: int = 1,
) -> dict[str, Any]:
    """One method's history, with every diverged seed removed from its divergence step on.

    Every curve of the training figures comes from here, so that a seed that
    has diverged contributes to no panel after its divergence: a method whose
    seeds have all diverged draws nothing from then on.

    Args:
      run: ``{"loss", "grad_norm", "clipped": [seeds, steps], "layers": {name: [seeds, steps]}}``
        ("clipped" and "layers" optional).
      stops: the divergence step of each seed, or None for a seed that did not diverge.
      window: the rolling window of the clip fraction, in steps.
      smooth: a rolling mean over at most this many steps for the loss and per-layer
        norms (fewer in the first steps, for a log step axis).

    Returns:
      ``loss``, ``grad_norm``: ``[seeds, steps]``, NaN after each seed's stop;
      ``loss_median``, ``grad_norm_median``: over the seeds still running;
      ``running``: how many seeds are still running at each step;
      ``clip_fraction``: the fraction of running seeds whose clip engaged, as
      a rolling mean over ``window`` steps (NaN once no seed runs);
      ``layers``: ``{name: median over running seeds}``.
    """
    loss = _cut(run["loss"], stops)
    steps = loss.shape[-1]
    alive = np.ones(loss.shape, bool)
    for i, stop in enumerate(stops or []):
        if stop is not None:
            alive[i, stop + 1:] = False
    if smooth > 1:
        loss = _rolling(loss, smooth, log=True)
    gn = _cut(run["grad_norm"], stops)
    out: dict[str, Any] = {
        "steps": np.arange(steps),
        "loss": loss,
        "grad_norm": gn,
        "running": alive.sum(axis=0),
        "loss_median": _nan_reduce(np.nanmedian, np.where(alive, loss, np.nan)),
        "grad_norm_median": _nan_reduce(np.nanmedian, np.where(alive, gn, np.nan)),
    }
    if "clipped" in run:
        c = np.where(alive, np.asarray(run["clipped"], np.float64), np.nan)
        out["clip_fraction"] = _rolling(_nan_reduce(np.nanmean, c), window)
    layers = {}
    for name, y in run.get("layers", {}).items():
        y = _cut(y, stops)
        y = np.where(y > 0, y, np.nan)
        med = _nan_reduce(np.nanmedian, y)
        layers[name] = _rolling(med, smooth, log=True) if smooth > 1 else med
    out["layers"] = layers
    return out


def _divergence_panel(ax, methods, diverged_at, steps, colours) -> None:
    """One row per method: each seed's divergence step (x), or a survivor's mark at the end."""
    for row, m in enumerate(methods):
        stops = list((diverged_at or {}).get(m) or [])
        div = sorted(s for s in stops if s is not None)
        alive = len(stops) - len(div)
        y = len(methods) - 1 - row
        if div:
            jitter = np.linspace(-0.18, 0.18, len(div)) if len(div) > 1 else np.zeros(1)
            ax.plot(np.asarray(div) + 1, y + jitter, "x", color="tab:red", ms=7, mew=2)
        if alive:
            ax.plot([steps], [y], "o", color="tab:green", ms=8, clip_on=False)
        note = (f"{len(div)}/{len(stops)} diverged" if div else f"all {len(stops)} ran")
        if div:
            note += f", by step {max(div) + 1}"
        ax.text(1.15, y + 0.28, note, fontsize=8.5, color="tab:red" if div else "tab:green",
                va="bottom")
    ax.set_yticks(range(len(methods)), list(reversed(methods)))
    ax.set_xscale("log")
    ax.set_xlim(0.8, steps * 1.6)
    ax.set_ylim(-0.6, len(methods) - 0.3)
    ax.set_xlabel("step of divergence (log)")
    ax.set_title("which runs diverged, and when\n(x: a seed diverged; o: ran all steps)",
                 fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    for y in range(len(methods)):
        ax.axhline(y, color="0.9", lw=0.8, zorder=0)


def plot_training(
    history: History,
    path: str | None = None,
    *,
    layers: Sequence[str] | None = None,
    title: str | None = None,
    reference_loss: float | None = None,
    window: int = 50,
    diverged_at: Mapping[str, Sequence[int | None]] | None = None,
    smooth: int = 1,
    dpi: int = 90,
):
    """The training figure: which runs diverged, then the loss of each method in its own panel.

    Left, one row per method: the step at which each seed diverged (log
    axis), or a green dot for a seed that ran to the end. Right, small
    multiples, one panel per method, all on the same axes (log step, log
    loss): each seed a thin line up to its divergence (an x there), the
    median over the seeds still running bold, and, in each panel's corner,
    the fraction of steps its clip engaged (over steps before divergence).
    The gradient norms, per-layer norms and clip fraction over time are in
    :func:`plot_training_details`.

    Args:
      history: see :data:`History`; arrays of shape ``[seeds, steps]``.
      path: where to save a PNG; None to only return the figure.
      layers: unused here (see :func:`plot_training_details`); kept for callers.
      title: the figure's title.
      reference_loss: a horizontal line on the loss panels (e.g. the loss of
        predicting the mean).
      window: the rolling window of the clip fraction, in steps.
      diverged_at: ``{method: [step or None per seed]}``; a diverged seed
        contributes nothing after that step, in any panel.
      smooth: a rolling mean over this many steps for the loss (1: raw).
      dpi: the PNG's resolution.

    Returns:
      The matplotlib ``Figure``.
    """
    del layers
    plt = _pyplot()
    methods = list(history)
    n = len(methods)
    ncol = min(4, n)
    nrow = -(-n // ncol)
    fig = plt.figure(figsize=(13, 1.2 + 2.6 * nrow), constrained_layout=True)
    gs = fig.add_gridspec(nrow, ncol + 1, width_ratios=[1.35] + [1] * ncol)
    steps = np.asarray(history[methods[0]]["loss"]).shape[-1]
    ax_div = fig.add_subplot(gs[:, 0])
    _divergence_panel(ax_div, methods, diverged_at, steps, None)
    first = None
    lo, hi = np.inf, 0.0
    aggs = {}
    for m in methods:
        stops = None if diverged_at is None else diverged_at.get(m)
        aggs[m] = aggregate_history(history[m], stops, window=window, smooth=smooth)
        fin = aggs[m]["loss"][np.isfinite(aggs[m]["loss"]) & (aggs[m]["loss"] > 0)]
        if fin.size:
            lo, hi = min(lo, np.percentile(fin, 0.5)), max(hi, fin.max())
    for k, m in enumerate(methods):
        ax = fig.add_subplot(gs[k // ncol, 1 + k % ncol], sharex=first, sharey=first)
        first = first or ax
        a = aggs[m]
        stops = (None if diverged_at is None else diverged_at.get(m)) or [None] * len(a["loss"])
        x = a["steps"] + 1
        for i, row in enumerate(a["loss"]):
            ax.plot(x, row, color="tab:blue", lw=0.6, alpha=0.45, gid=m)
            s = stops[i] if i < len(stops) else None
            if s is not None:
                yv = np.asarray(history[m]["loss"], np.float64)[i, s]
                yv = yv if np.isfinite(yv) else hi
                ax.plot(s + 1, min(yv, hi), "x", color="tab:red", ms=7, mew=2)
        ax.plot(x, a["loss_median"], color="tab:blue", lw=1.8, gid=m)
        if reference_loss is not None:
            ax.axhline(reference_loss, color="k", ls=":", lw=1)
        n_div = sum(s is not None for s in stops)
        clip = np.asarray(history[m].get("clipped", np.zeros((1, 1))), np.float64)
        alive = ~np.isnan(_cut(np.zeros(clip.shape), stops))
        frac = clip[alive].mean() if alive.any() else np.nan
        head = m if not n_div else f"{m}: {n_div} of {len(stops)} diverged"
        ax.set_title(head, fontsize=10, color="tab:red" if n_div == len(stops) else "k")
        if m != "none" and np.isfinite(frac):
            ax.text(0.04, 0.04, f"clipped on {frac:.0%} of steps run", transform=ax.transAxes,
                    ha="left", va="bottom", fontsize=8.5, color="0.2",
                    bbox=dict(fc="white", ec="none", alpha=0.8, pad=1))
        ax.set(xscale="log", yscale="log")
        ax.grid(alpha=0.3)
        if k // ncol == nrow - 1:
            ax.set_xlabel("step (log)")
        if k % ncol == 0:
            ax.set_ylabel("training loss" + (f"\n(rolling mean, up to {smooth} steps)"
                                              if smooth > 1 else ""))
    if first is not None and np.isfinite(lo):
        first.set_ylim(lo * 0.8, hi * 1.5)
        first.set_xlim(1, steps * 1.05)
    key = ("thin: one seed; bold: median of the seeds still running; x: a seed diverged"
           + ("; dotted: the loss of predicting the mean" if reference_loss is not None else ""))
    return _finish(fig, path, (title + "\n" if title else "") + key, dpi=dpi)


def plot_training_details(
    history: History,
    path: str | None = None,
    *,
    layers: Sequence[str] | None = None,
    title: str | None = None,
    window: int = 50,
    diverged_at: Mapping[str, Sequence[int | None]] | None = None,
    smooth: int = 1,
    dpi: int = 72,
):
    """One row per method: the pre-clip gradient norm, the per-layer norms, the clip fraction.

    Every panel drops a seed from its divergence step on (see
    :func:`aggregate_history`); a method whose seeds all diverged shows its
    few steps and then nothing. The per-layer panel is the diagnostic for
    vanishing gradients: a layer whose norm decays towards zero while the
    loss is stuck is starved of signal, and no clipper changes that.

    Args: as :func:`plot_training`; ``layers`` names the per-layer norms drawn.

    Returns:
      The matplotlib ``Figure``.
    """
    plt = _pyplot()
    methods = list(history)
    fig, axes = plt.subplots(len(methods), 3, figsize=(12, 1.55 * len(methods) + 0.8),
                             sharex=True, constrained_layout=True, squeeze=False)
    styles = ["-", "--", ":", "-."]
    steps = np.asarray(history[methods[0]]["loss"]).shape[-1]
    for r, m in enumerate(methods):
        stops = None if diverged_at is None else diverged_at.get(m)
        a = aggregate_history(history[m], stops, window=window, smooth=smooth)
        x = a["steps"] + 1
        ax_n, ax_l, ax_c = axes[r]
        for row in a["grad_norm"]:
            ax_n.plot(x, row, color="tab:blue", lw=0.4, alpha=0.35, gid=m)
        ax_n.plot(x, a["grad_norm_median"], color="tab:blue", lw=1.4, gid=m)
        ax_n.set(yscale="log", ylabel=f"{m}\n|g| (pre-clip)")
        names = list(layers) if layers is not None else list(a["layers"])
        for i, name in enumerate(names):
            short = name.split(".")[-2] if "." in name else name
            short = {"dense_h": "recurrent (dense_h)", "dense_i": "input (dense_i)"}.get(short,
                                                                                        short)
            ax_l.plot(x, a["layers"][name], color="tab:purple", ls=styles[i % 4], lw=1.2,
                      label=short, gid=m)
        ax_l.set(yscale="log", ylabel="layer |g|")
        if r == 0 and names:
            ax_l.legend(fontsize=7, loc="upper right")
        if "clip_fraction" in a and m != "none":
            ax_c.plot(x, a["clip_fraction"], color="tab:orange", lw=1.3, gid=m)
        elif m == "none":
            ax_c.text(0.5, 0.5, "no clipper", transform=ax_c.transAxes, ha="center",
                      color="0.4")
        ax_c.set(ylim=(-0.03, 1.03), ylabel="clipped")
        n_div = sum(s is not None for s in stops or [])
        if n_div:
            last = max(s for s in stops if s is not None)
            for ax in axes[r]:
                ax.axvline(last + 1, color="tab:red", lw=0.8, ls="--")
            ax_c.text(0.02, 0.85, f"{n_div} seed(s) diverged, the last at step {last + 1}",
                      transform=ax_c.transAxes, fontsize=7.5, color="tab:red")
        for ax in axes[r]:
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
    axes[0, 0].set_title("global gradient norm before clipping\n(thin: seeds, bold: median)",
                         fontsize=10)
    axes[0, 1].set_title("per-layer gradient norms\n(median over running seeds)", fontsize=10)
    axes[0, 2].set_title(f"fraction of running seeds clipped\n(rolling {window} steps)",
                         fontsize=10)
    for ax in axes[-1]:
        ax.set_xlabel("step (log)")
        ax.set_xlim(1, steps * 1.05)
    return _finish(fig, path, title, dpi=dpi)


def plot_divergence_sweep(
    lrs: Sequence[float],
    diverged: Mapping[str, Sequence[float]],
    path: str | None = None,
    *,
    final_loss: Mapping[str, Sequence[float]] | None = None,
    title: str | None = None,
):
    """The fraction of seeds that diverge against the learning rate, per method.

    Args:
      lrs: the learning rates.
      diverged: ``{method: fraction diverged at each lr}``.
      path: where to save a PNG.
      final_loss: optionally ``{method: median final loss at each lr}`` (NaN
        where every seed diverged), drawn in a second panel.
      title: the figure's title.

    Returns:
      The matplotlib ``Figure``.
    """
    plt = _pyplot()
    colours = _colours(list(diverged))
    n = 2 if final_loss is not None else 1
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.5), constrained_layout=True, squeeze=False)
    ax = axes[0, 0]
    for i, (m, frac) in enumerate(diverged.items()):
        ax.plot(lrs, np.asarray(frac) + 0.01 * i, "o-", color=colours[m], label=m)
    ax.set(xscale="log", xlabel="learning rate",
           ylabel="fraction of seeds diverged (lines offset by 0.01 each)",
           ylim=(-0.05, 1.1), title="divergence against learning rate")
    ax.legend(fontsize=8)
    if final_loss is not None:
        ax2 = axes[0, 1]
        for m, loss in final_loss.items():
            ax2.plot(lrs, loss, "o-", color=colours[m], label=m)
        ax2.set(xscale="log", yscale="log", xlabel="learning rate",
                ylabel="median final loss (seeds that did not diverge)",
                title="final loss against learning rate")
        ax2.legend(fontsize=8)
    return _finish(fig, path, title)


def descend(
    f: Callable[[jax.Array], jax.Array],
    start: Sequence[float],
    tx: optax.GradientTransformation,
    steps: int,
) -> np.ndarray:
    """The trajectory of ``tx`` minimising a 2-D function ``f`` from ``start``: [steps + 1, 2]."""

    @jax.jit
    def run(x0):
        def body(carry, _):
            x, s = carry
            u, s = tx.update(jax.grad(f)(x), s, x)
            x = optax.apply_updates(x, u)
            return (x, s), x

        _, xs = jax.lax.scan(body, (x0, tx.init(x0)), None, length=steps)
        return jnp.concatenate([x0[None], xs])

    return np.asarray(run(jnp.asarray(start, jnp.float32)))


def plot_gradient_field(
    f: Callable[[jax.Array], jax.Array],
    clip: optax.GradientTransformation,
    path: str | None = None,
    *,
    xlim: tuple[float, float] = (-1.0, 1.0),
    ylim: tuple[float, float] = (-1.0, 1.0),
    start: Sequence[float] | None = None,
    lr: float = 0.1,
    steps: int = 60,
    grid: int = 21,
    title: str | None = None,
    minimum: Sequence[float] | None = None,
    cliff: tuple[tuple[float, float], str] | None = None,
    dpi: int = 80,
):
    """Raw gradients beside clipped ones on a 2-D loss surface, with descent paths.

    Left: the negative gradient field of ``f`` over a grid (arrow length in
    log scale, so that both the cliff and the plateau are visible) and the
    SGD path without clipping. Right: the same field after ``clip``, and the
    SGD path with ``clip`` chained before SGD.

    Args:
      f: a scalar function of a 2-vector.
      clip: the clipper (e.g. ``optclip.clip_by_global_norm(1.0)``).
      path: where to save a PNG.
      xlim, ylim: the window.
      start: where both descents start (defaults to the window's corner).
      lr: SGD's learning rate.
      steps: SGD steps.
      grid: arrows per side.
      title: the figure's title.
      minimum: where to mark the minimum (a star), if given.
      cliff: ``((x, y), text)``: a label for the cliff, written at ``(x, y)``.
      dpi: the PNG's resolution.

    Returns:
      ``(figure, raw_path, clipped_path)``, the paths as [steps + 1, 2] arrays.
    """
    plt = _pyplot()
    xs = np.linspace(*xlim, grid, dtype=np.float32)
    ys = np.linspace(*ylim, grid, dtype=np.float32)
    gx, gy = np.meshgrid(xs, ys)
    pts = jnp.stack([gx.ravel(), gy.ravel()], axis=1)
    grads = jax.vmap(jax.grad(f))(pts)
    clipped = jax.vmap(lambda g: clip.update(g, clip.init(g))[0])(grads)
    fx = np.linspace(*xlim, 200, dtype=np.float32)
    fy = np.linspace(*ylim, 200, dtype=np.float32)
    FX, FY = np.meshgrid(fx, fy)
    Z = np.asarray(jax.vmap(f)(jnp.stack([FX.ravel(), FY.ravel()], 1))).reshape(FX.shape)
    start = [xlim[0] + 0.1 * (xlim[1] - xlim[0]), ylim[0] + 0.1 * (ylim[1] - ylim[0])] \
        if start is None else start
    raw_path = descend(f, start, optax.sgd(lr), steps)
    clip_path = descend(f, start, optax.chain(clip, optax.sgd(lr)), steps)
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 5.4), constrained_layout=True)
    raw_n = np.linalg.norm(np.asarray(grads, np.float64), axis=1)
    clim = (np.log10(raw_n.min() + 1e-12), np.log10(raw_n.max() + 1e-12))
    q = None
    for ax, g, p, name in ((axes[0], grads, raw_path, "raw gradients, plain SGD"),
                           (axes[1], clipped, clip_path, "clipped gradients, SGD + clip")):
        g = -np.asarray(g, np.float64)
        n = np.linalg.norm(g, axis=1, keepdims=True)
        # arrow length ~ log(1 + |g|): the cliff's huge gradients stay on the page
        d = np.where(n > 0, g / np.where(n > 0, n, 1) * np.log1p(n), 0.0)
        ax.contourf(FX, FY, Z, levels=30, cmap="Greys", alpha=0.6)
        q = ax.quiver(gx, gy, d[:, 0], d[:, 1], np.log10(n[:, 0] + 1e-12), cmap="viridis",
                      angles="xy", clim=clim)
        finite = np.all(np.isfinite(p), axis=1) & (np.abs(p) < 1e6).all(axis=1)
        pp = p[finite]
        ax.plot(pp[:, 0], pp[:, 1], "o-", color="tab:red", ms=3, lw=1.2,
                label=f"SGD path, lr={lr}" + (" + clip" if "clip" in name else ""))
        ax.plot(pp[0, 0], pp[0, 1], "s", color="tab:red", ms=8, label="start")
        if minimum is not None:
            ax.plot(minimum[0], minimum[1], "*", color="gold", mec="k", ms=17, zorder=5,
                    label="minimum")
        if cliff is not None:
            (cx, cy), text = cliff
            ax.text(cx, cy, text, fontsize=10, color="k", rotation=-45, ha="center",
                    va="center", bbox=dict(boxstyle="round,pad=0.2", fc="white", alpha=0.8))
        ax.set(xlim=xlim, ylim=ylim, title=name, xlabel="w1", ylabel="w2")
        ax.set_aspect("equal", adjustable="box")
        ax.legend(loc="upper right", fontsize=8.5)
    fig.colorbar(q, ax=list(axes), shrink=0.75,
                 label="log10 |gradient| at the arrow (same scale in both panels)")
    return _finish(fig, path, title, dpi=dpi), raw_path, clip_path


def plot_lm_spikes(
    summary: Mapping[str, Any],
    history: Mapping[tuple[str, str], Mapping[str, Any]],
    path: str | None = None,
    *,
    show: Sequence[str] = ("none", "global_norm", "zclip"),
    seed: int = 0,
    smooth: int = 5,
    title: str | None = None,
    dpi: int = 80,
):
    """The LM demo's figure: one row per scenario.

    Columns: the clean training loss of one seed for a few methods, with
    each counted spike marked; the gradient norm before clipping with the
    thresholds in force (a fixed one against an adaptive one); loss spikes
    per method (bar: mean over seeds, dots: each seed); held-out loss per
    method (each seed a dot, diverged seeds a red x at the right edge).

    Args:
      summary: the demo's ``summary.json`` (``config`` and ``runs``).
      history: ``{(scenario, method): {"loss", "glitch", "grad_norm",
        "threshold": [seeds, steps]}}``.
      path: where to save a PNG.
      show: the methods drawn in the two left columns.
      seed: the seed drawn in the two left columns.
      smooth: a rolling mean of the drawn losses, in steps.
      title: the figure's title.
      dpi: the PNG's resolution.

    Returns:
      The matplotlib ``Figure``.
    """
    plt = _pyplot()
    cfg = summary["config"]
    scenarios, methods = list(cfg["scenarios"]), list(cfg["methods"])
    show = [m for m in show if m in methods]
    colours = {"none": "0.45", "global_norm": "tab:blue", "zclip": "tab:orange",
               "adagc": "tab:green", "autoclip": "tab:purple", "skip_on_spike": "tab:brown",
               "zclip+skip_nonfinite": "tab:pink"}
    fig, axes = plt.subplots(len(scenarios), 4, figsize=(15, 3.6 * len(scenarios) + 0.6),
                             gridspec_kw={"width_ratios": [1.5, 1.5, 1, 1]},
                             constrained_layout=True, squeeze=False)
    for r, sc in enumerate(scenarios):
        ax_l, ax_g, ax_s, ax_h = axes[r]
        runs = {m: [x for x in summary["runs"] if x["scenario"] == sc and x["method"] == m]
                for m in methods}
        for m in show:
            h = history[(sc, m)]
            loss = np.asarray(h["loss"][seed], np.float64)
            g = np.asarray(h["glitch"][seed], bool)
            y = np.where(g, np.nan, loss)
            steps = np.arange(len(y))
            ys = _rolling(y, smooth) if smooth > 1 else y
            ax_l.plot(steps, ys, color=colours.get(m), lw=1.1, label=m)
            sp = runs[m][seed]["spike_steps"] if seed < len(runs[m]) else []
            if sp:
                ax_l.plot(sp, y[sp], "v", color=colours.get(m), ms=7, mec="k", mew=0.6)
            gn = np.asarray(h["grad_norm"][seed], np.float64)
            if m == show[0]:
                ax_g.plot(steps, gn, color=colours.get(m), lw=0.6, label=f"|g| ({m})")
                ax_g.plot(steps[g], gn[g], ".", color="tab:red", ms=5,
                          label="glitch steps")
                ax_l.plot(steps[g], np.full(g.sum(), np.nanpercentile(y, 1) * 0.97), "|",
                          color="tab:red", ms=6, label="glitch steps")
            th = np.asarray(h.get("threshold", np.full_like(gn, np.nan))[seed], np.float64)
            th = np.where(np.isfinite(th), th, np.nan)
            if np.isfinite(th).any() and m != "none":
                ax_g.plot(steps, th, color=colours.get(m), lw=1.6, label=f"threshold ({m})")
        ax_l.set(xlabel="step", ylabel=f"{sc.upper()}\ntraining loss on clean steps\n"
                 f"(seed {seed}, rolling {smooth})")
        lo, hi = ax_l.get_ylim()
        ax_l.set_ylim(max(lo, 0.0), hi)
        ax_l.legend(fontsize=8, loc="upper right")
        ax_l.grid(alpha=0.3)
        ax_g.set(yscale="log", xlabel="step", ylabel="gradient norm (before clipping)")
        ax_g.legend(fontsize=7.5, loc="best")
        ax_g.grid(alpha=0.3)
        ys = np.arange(len(methods))[::-1]
        for y, m in zip(ys, methods, strict=True):
            sp = [x["spikes"] for x in runs[m]]
            ax_s.barh(y, np.mean(sp) if sp else 0, color=colours.get(m), alpha=0.8)
            ax_s.plot(sp, y + np.linspace(-0.2, 0.2, len(sp)), "o", color="k", ms=3.5)
            held = [x["heldout_loss"] for x in runs[m]]
            div = [x["diverged"] for x in runs[m]]
            ok = [v for v, d in zip(held, div, strict=True) if v is not None and not d]
            ax_h.plot(ok, y + np.linspace(-0.2, 0.2, len(held))[: len(ok)], "o",
                      color=colours.get(m), ms=6, mec="k", mew=0.5)
            if np.any(div):
                ax_h.text(0.98, y, f"{sum(div)} diverged", color="tab:red", ha="right",
                          va="center", transform=ax_h.get_yaxis_transform(), fontsize=8)
        for ax in (ax_s, ax_h):
            ax.set_yticks(ys, methods, fontsize=8.5)
            ax.grid(axis="x", alpha=0.3)
        ax_s.set(xlabel="loss spikes per run (bar: mean, dot: a seed)")
        ax_h.set(xlabel="held-out loss (nats/byte)")
        if r == 0:
            ax_l.set_title("training loss (v: a counted spike)", fontsize=10)
            ax_g.set_title(f"gradient norm of {show[0]} (seed {seed}), and the thresholds "
                           "the clippers used", fontsize=10)
            ax_s.set_title("loss spikes", fontsize=10)
            ax_h.set_title("held-out loss (lower is better)", fontsize=10)
    return _finish(fig, path, title, dpi=dpi)
