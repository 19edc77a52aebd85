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

__all__ = ["plot_training", "plot_divergence_sweep", "plot_gradient_field", "descend"]

History = Mapping[str, Mapping[str, Any]]
"""``{method: {"loss": [seeds, steps], "grad_norm": [seeds, steps], "clipped": [seeds, steps],
"layers": {name: [seeds, steps]}}}``: what the RNN demo records with ``optclip.stats``."""


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, path: Any, title: str | None):
    if title:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(path, dpi=72)
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


def _seeds_and_median(ax, y: np.ndarray, colour, label: str, log: bool,
                      stops: Sequence[int | None] | None = None) -> None:
    """Thin line per seed, bold median (over the seeds still running); x where a seed diverged."""
    y = _cut(y, stops)
    steps = np.arange(y.shape[-1])
    if log:
        y = np.where(y > 0, y, np.nan)
    for i, row in enumerate(y):
        ax.plot(steps, row, color=colour, lw=0.5, alpha=0.35)
        if stops is not None and stops[i] is not None and np.isfinite(row[stops[i]]):
            ax.plot(stops[i], row[stops[i]], "x", color=colour, ms=8, mew=2)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(y, axis=0)
    ax.plot(steps, med, color=colour, lw=2.0, label=label)
    if log:
        ax.set_yscale("log")


def _rolling(x: np.ndarray, w: int) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.shape[-1] < w or w <= 1:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0, axis=-1), axis=-1)
    out = (c[..., w:] - c[..., :-w]) / w
    pad = np.full(x.shape[:-1] + (w - 1,), np.nan)
    return np.concatenate([pad, out], axis=-1)


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
):
    """Four panels: loss, pre-clip global norm, per-layer norms, and how often clipping engaged.

    One colour per method; each seed a thin line, the median over seeds bold.
    The per-layer panel is the diagnostic for vanishing gradients: a layer
    whose norm decays towards zero while the loss is stuck is starved of
    signal, and no clipper changes that.

    Args:
      history: see :data:`History`; arrays of shape ``[seeds, steps]``.
      path: where to save a PNG; None to only return the figure.
      layers: the per-layer norms to draw (all by default); line styles
        tell them apart.
      title: the figure's title.
      reference_loss: a horizontal line on the loss panel (e.g. the loss of
        predicting the mean).
      window: the rolling window of the "clipped" panel, in steps.
      diverged_at: ``{method: [step or None per seed]}``; a diverged seed is
        drawn up to that step and marked with an x there.
      smooth: a rolling mean over this many steps for the loss and the
        per-layer norms (1: raw).

    Returns:
      The matplotlib ``Figure``.
    """
    plt = _pyplot()
    methods = list(history)
    colours = _colours(methods)
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), constrained_layout=True)
    ax_loss, ax_norm, ax_layer, ax_clip = axes.ravel()
    styles = ["-", "--", ":", "-."]
    names: list[str] = []
    for m in methods:
        h = history[m]
        stops = None if diverged_at is None else diverged_at.get(m)
        n_div = sum(s is not None for s in stops or [])
        label = m if not n_div else f"{m} ({n_div} diverged, x)"
        loss = _cut(h["loss"], stops)
        if smooth > 1:  # a rolling mean, so that 8 methods x seeds stay readable
            loss = _rolling(loss, smooth)
            loss[:, :smooth - 1] = _cut(h["loss"], stops)[:, :smooth - 1]
        _seeds_and_median(ax_loss, loss, colours[m], label, log=True, stops=stops)
        _seeds_and_median(ax_norm, h["grad_norm"], colours[m], label, log=True, stops=stops)
        names = list(layers) if layers is not None else list(h.get("layers", {}))
        for i, name in enumerate(names):
            y = _cut(h["layers"][name], stops)
            with np.errstate(all="ignore"):
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    med = np.nanmedian(np.where(y > 0, y, np.nan), axis=0)
            ax_layer.plot(_rolling(med, smooth) if smooth > 1 else med, color=colours[m],
                          ls=styles[i % len(styles)], lw=1.3, label=m if i == 0 else None)
        if "clipped" in h and m != "none":
            frac = _rolling(np.asarray(h["clipped"], np.float64).mean(axis=0), window)
            ax_clip.plot(frac, color=colours[m], lw=1.5, label=m)
    for i, name in enumerate(names):
        ax_layer.plot([], [], color="k", ls=styles[i % len(styles)], label=name)
    if reference_loss is not None:
        ax_loss.axhline(reference_loss, color="k", ls=":", lw=1, label="predict the mean")
    ax_loss.set(title="training loss (MSE)" + (f", rolling mean of {smooth}" if smooth > 1
                                                else ""), xlabel="step")
    ax_norm.set(title="global gradient norm, before clipping", xlabel="step")
    ax_layer.set(title="per-layer gradient norms (median over seeds"
                       + (f", rolling {smooth})" if smooth > 1 else ")"), xlabel="step",
                 yscale="log")
    ax_clip.set(title=f"fraction of steps the clip engaged (rolling {window})", xlabel="step",
                ylim=(-0.02, 1.02))
    for ax in (ax_loss, ax_norm, ax_clip):
        ax.legend(fontsize=8, loc="best")
    ax_layer.legend(fontsize=7, loc="best", ncol=2)
    if diverged_at is not None:
        ax_loss.text(0.01, 0.01, "a diverged seed is drawn up to its divergence, marked x",
                     transform=ax_loss.transAxes, fontsize=8, color="0.3")
    return _finish(fig, path, title)


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
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.4), constrained_layout=True)
    raw_n = np.linalg.norm(np.asarray(grads, np.float64), axis=1)
    clim = (np.log10(raw_n.min() + 1e-12), np.log10(raw_n.max() + 1e-12))
    for ax, g, p, name in ((axes[0], grads, raw_path, "raw gradients"),
                           (axes[1], clipped, clip_path, "clipped gradients")):
        g = -np.asarray(g, np.float64)
        n = np.linalg.norm(g, axis=1, keepdims=True)
        # arrow length ~ log(1 + |g|): the cliff's huge gradients stay on the page
        d = np.where(n > 0, g / np.where(n > 0, n, 1) * np.log1p(n), 0.0)
        ax.contourf(FX, FY, Z, levels=30, cmap="Greys", alpha=0.6)
        q = ax.quiver(gx, gy, d[:, 0], d[:, 1], np.log10(n[:, 0] + 1e-12), cmap="viridis",
                      angles="xy", clim=clim)
        fig.colorbar(q, ax=ax, label="log10 |gradient| (same scale in both panels)")
        finite = np.all(np.isfinite(p), axis=1) & (np.abs(p) < 1e6).all(axis=1)
        pp = p[finite]
        ax.plot(pp[:, 0], pp[:, 1], "o-", color="tab:red", ms=3, lw=1.2,
                label=f"SGD lr={lr}" + (" + clip" if name.startswith("clipped") else ""))
        ax.plot(pp[0, 0], pp[0, 1], "s", color="tab:red", ms=7)
        ax.set(xlim=xlim, ylim=ylim, title=name, xlabel="w1", ylabel="w2")
        ax.legend(loc="upper right", fontsize=8)
    return _finish(fig, path, title), raw_path, clip_path
