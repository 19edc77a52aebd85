"""Exploding gradients in a Flax RNN, stabilised by clipping, and what clipping does not do.

The task is the adding problem (Hochreiter & Schmidhuber 1997; Pascanu et al.
2013): a sequence of T (value, marker) pairs, two of them marked, and the
target is the sum of the two marked values. Predicting the mean gives an MSE
of 1/6. A vanilla RNN (``nnx.SimpleCell``, 64 units, Flax's default
orthogonal recurrent init) is trained with plain SGD at lr 0.1, a fresh
batch of 64 each step.

What it shows, honestly:

* Without clipping, every seed blows up within the first few dozen steps:
  the learning rate is simply too large for this network. This is an early
  blow-up, not the mid-training cliff of Pascanu et al.
* With ``clip_by_global_norm(1.0)`` no seed diverges. The clip is active on
  most steps, so here it behaves like normalised SGD rather than a rare
  safety net; the loss sits near 1/6 for several hundred steps, then falls.
* ``--sweep`` shows the honest claim: clipping widens the range of stable
  learning rates. Unclipped SGD at a lower learning rate does not diverge,
  but learns less in the same number of steps.
* Clipping bounds large gradients. It does nothing for vanishing ones: the
  per-layer panel is where a user would see a layer starved of gradient.

Every step's loss, pre-clip norm, per-layer norms and clip flag are recorded
on the device inside a ``lax.scan`` (from ``optclip.stats``) and fetched once
per chunk: no host sync per step. Seeds are ``vmap``-ed, so one compile
serves all seeds of a method.

Run:  python examples/rnn_exploding.py            (about 2 minutes on 2 CPU cores)
      python examples/rnn_exploding.py --sweep    (adds the learning-rate sweep)
      python examples/rnn_exploding.py --quick    (seconds; for tests)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import optclip
from optclip.plotting import plot_divergence_sweep, plot_training, plot_training_details

MEAN_PREDICTOR_LOSS = 1.0 / 6.0
ALL_METHODS = ("none", "global_norm", "value", "leaf_norm", "agc", "autoclip", "zclip", "adagc")


def make_clipper(method: str) -> optax.GradientTransformation | None:
    """The clipper each method name stands for (recorded in summary.json's config)."""
    return {
        "none": lambda: None,
        "global_norm": lambda: optclip.clip_by_global_norm(1.0),
        "value": lambda: optclip.clip_by_value(0.1),
        "leaf_norm": lambda: optclip.clip_by_leaf_norm(1.0),
        "agc": lambda: optclip.agc(0.01),
        "autoclip": lambda: optclip.autoclip(10.0),
        "zclip": lambda: optclip.zclip(),
        "adagc": lambda: optclip.adagc(),
    }[method]()


CLIPPER_SETTINGS = {
    "none": "optax.sgd(lr) alone",
    "global_norm": "clip_by_global_norm(1.0)",
    "value": "clip_by_value(0.1)",
    "leaf_norm": "clip_by_leaf_norm(1.0)",
    "agc": "agc(0.01)",
    "autoclip": "autoclip(10.0)",
    "zclip": "zclip() (defaults: 25 warm-up steps, no max_norm)",
    "adagc": "adagc() (defaults: 100 warm-up steps at lambda_abs=1.0)",
}


class Model(nnx.Module):
    def __init__(self, cell: str, hidden: int, rngs: nnx.Rngs):
        if cell == "lstm":
            c = nnx.LSTMCell(2, hidden, rngs=rngs)
        else:
            c = nnx.SimpleCell(2, hidden, rngs=rngs)
        self.rnn = nnx.RNN(c)
        self.out = nnx.Linear(hidden, 1, rngs=rngs)
        self.lstm = cell == "lstm"
        self.hidden = hidden

    def __call__(self, x):
        # A zero initial state, given explicitly (RNN would otherwise draw on its Rngs).
        z = jnp.zeros((x.shape[0], self.hidden), x.dtype)
        h = self.rnn(x, initial_carry=(z, z) if self.lstm else z)
        return self.out(h[:, -1])[:, 0]


def adding_batch(key, batch: int, seq_len: int):
    """The adding problem: x[..., 0] ~ U(0, 1); one marker in each half; y = sum of marked."""
    kv, k1, k2 = jax.random.split(key, 3)
    values = jax.random.uniform(kv, (batch, seq_len))
    half = seq_len // 2
    i1 = jax.random.randint(k1, (batch,), 0, half)
    i2 = jax.random.randint(k2, (batch,), half, seq_len)
    pos = jnp.arange(seq_len)
    markers = ((pos == i1[:, None]) | (pos == i2[:, None])).astype(jnp.float32)
    return jnp.stack([values, markers], -1), jnp.sum(values * markers, axis=1)


def layer_name(path) -> str:
    name = jax.tree_util.keystr(path, simple=True, separator=".")
    return name.removesuffix(".value")


class Trainer:
    """One jitted, seed-vmapped chunk of training per method, compiled once."""

    def __init__(self, method: str, cell: str, hidden: int, seq_len: int, batch: int,
                 chunk: int):
        self.method = method
        clipper = make_clipper(method)
        self.graphdef, _, self.rest = nnx.split(Model(cell, hidden, nnx.Rngs(0)), nnx.Param, ...)
        self.cell, self.hidden, self.seq_len, self.batch = cell, hidden, seq_len, batch

        def make_tx(lr):
            sgd = optax.sgd(lr)
            return sgd if clipper is None else optax.chain(clipper, sgd)

        self.make_tx = make_tx

        def loss_fn(params, x, y):
            model = nnx.merge(self.graphdef, params, self.rest)
            return jnp.mean((model(x) - y) ** 2)

        def step(carry, key):
            params, opt_state, lr = carry
            x, y = adding_batch(key, batch, seq_len)
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, opt_state = make_tx(lr).update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            # what the clipper saw: no second pass over grads ("none" has no clipper)
            s = optclip.stats(opt_state) if clipper is not None else {}
            leaf = jax.tree_util.tree_flatten_with_path(optclip.leaf_norms(grads))[0]
            rec = {
                "loss": loss,
                "grad_norm": s["grad_norm"] if s else optclip.global_norm(grads),
                "clipped": s["clipped"] if s else jnp.zeros((), bool),
                "layers": {layer_name(k): v for k, v in leaf},
            }
            return (params, opt_state, lr), rec

        def run_chunk(params, opt_state, lr, keys):
            (params, opt_state, _), hist = jax.lax.scan(step, (params, opt_state, lr), keys)
            return params, opt_state, hist

        # vmap over runs (seeds, or seeds x learning rates), then one jit
        self.run_chunk = jax.jit(jax.vmap(run_chunk), donate_argnums=(0, 1))
        self.chunk = chunk

    def init(self, seeds: np.ndarray, lrs: np.ndarray):
        def init_one(seed, lr):
            key = jax.random.key(seed)
            _, params, _ = nnx.split(Model(self.cell, self.hidden, nnx.Rngs(key)), nnx.Param, ...)
            return params, self.make_tx(lr).init(params)

        return jax.jit(jax.vmap(init_one))(jnp.asarray(seeds), jnp.asarray(lrs, jnp.float32))

    def train(self, seeds, lrs, steps: int, bar: tqdm | None = None):
        params, opt_state = self.init(seeds, lrs)
        lrs = jnp.asarray(lrs, jnp.float32)
        data_keys = jax.vmap(lambda s: jax.random.split(jax.random.fold_in(
            jax.random.key(1234), s), steps))(jnp.asarray(seeds))
        hists = []
        first_loss = None
        for start in range(0, steps, self.chunk):
            keys = data_keys[:, start:start + self.chunk]
            if keys.shape[1] < self.chunk:  # keep one compiled shape: pad, then trim
                pad = self.chunk - keys.shape[1]
                keys = jnp.concatenate([keys, keys[:, :pad]], axis=1)
            params, opt_state, hist = self.run_chunk(params, opt_state, lrs, keys)
            hist = jax.device_get(hist)
            hists.append(hist)
            if bar is not None:
                bar.update(min(self.chunk, steps - start))
            if first_loss is None:
                first_loss = hist["loss"][:, 0]
            lost = ~np.isfinite(hist["loss"]) | (hist["loss"] > 10.0 * first_loss[:, None])
            if np.all(lost.any(axis=1)) and start + self.chunk < steps:
                # every run has diverged: the rest would be NaN; record it as such
                rest = steps - start - self.chunk
                hists.append(jax.tree.map(
                    lambda x, n=rest: np.full(x.shape[:1] + (n,) + x.shape[2:], np.nan), hist))
                if bar is not None:
                    bar.update(rest)
                break
        hist = jax.tree.map(lambda *xs: np.concatenate(xs, axis=1)[:, :steps], *hists)
        return hist


def summarise(method: str, seeds, hist, lr=None) -> list[dict]:
    runs = []
    loss = np.asarray(hist["loss"], np.float64)
    for i, seed in enumerate(seeds):
        row = loss[i]
        bad = ~np.isfinite(row) | (row > 10.0 * row[0])
        first = int(np.argmax(bad)) if bad.any() else None
        tail = row[-min(100, len(row)):]
        gn = np.asarray(hist["grad_norm"][i], np.float64)
        run = {
            "method": method,
            "seed": int(seed),
            "diverged": bool(bad.any()),
            "steps_to_divergence": first,
            "final_loss": float(np.mean(tail)) if not bad.any() else None,
            "max_grad_norm": float(np.nanmax(np.where(np.isfinite(gn), gn, np.nan)))
            if np.isfinite(gn).any() else None,
            # over the steps before divergence (a diverged run stops being recorded)
            "clip_fraction": float(np.nanmean(np.asarray(hist["clipped"][i], np.float64)
                                              [:None if first is None else first + 1])),
        }
        if lr is not None:
            run["lr"] = float(lr[i])
        runs.append(run)
    return runs


def print_table(runs: list[dict], methods) -> None:
    print(f"\n{'method':<12} {'diverged':>9} {'first divergence':>17} {'final MSE (range)':>22} "
          f"{'clip engaged':>13} {'max |g|':>10}")
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        div = sum(r["diverged"] for r in rs)
        firsts = [r["steps_to_divergence"] for r in rs if r["diverged"]]
        losses = [r["final_loss"] for r in rs if r["final_loss"] is not None]
        gmax = [r["max_grad_norm"] for r in rs if r["max_grad_norm"] is not None]
        first = f"step {min(firsts)}-{max(firsts)}" if firsts else "-"
        loss = f"{min(losses):.3f}-{max(losses):.3f}" if losses else "-"
        clip = np.mean([r["clip_fraction"] for r in rs])
        print(f"{m:<12} {div:>4} of {len(rs):<2} {first:>17} {loss:>22} "
              f"{clip:>12.0%} {max(gmax) if gmax else float('nan'):>10.3g}")
    print(f"(predicting the mean scores {MEAN_PREDICTOR_LOSS:.3f}; a run has diverged when its "
          "loss is non-finite or above 10x its first loss)")


def table(summary: dict) -> str:
    """The markdown table of outcomes (what the README shows), from a summary.json."""
    cfg = summary["config"]
    lines = ["| method | diverged | final MSE (last 100 steps) | clip engaged |",
             "|---|---|---|---|"]
    for m in cfg["methods"]:
        rs = [r for r in summary["runs"] if r["method"] == m]
        firsts = [r["steps_to_divergence"] + 1 for r in rs if r["diverged"]]
        ok = [r for r in rs if not r["diverged"]]
        div = f"{len(firsts)} of {len(rs)}" + (f", by step {max(firsts)}" if firsts else "")
        loss = (f"{min(r['final_loss'] for r in ok):.3f}-{max(r['final_loss'] for r in ok):.3f}"
                + (f" (the {len(ok)} that ran)" if firsts else "")) if ok else "-"
        name = "none" if m == "none" else f"`{cfg['clippers'][m]}`"
        clip = "-" if m == "none" or not ok else f"{np.mean([r['clip_fraction'] for r in ok]):.0%}"
        lines.append(f"| {name} | {div} | {loss} | {clip} |")
    return "\n".join(lines)


def draw(history: dict, runs: list[dict], args, out: Path) -> None:
    """The main figure (divergence, then loss per method) and the detailed one."""
    stops = {m: [r["steps_to_divergence"] for r in runs if r["method"] == m]
             for m in args.methods}
    layers = [n for n in ("rnn.cell.dense_h.kernel", "rnn.cell.dense_i.kernel")
              if n in history[args.methods[0]]["layers"]]
    smooth = max(1, min(25, args.steps // 40))
    what = (f"{args.cell.upper()} on the adding problem (T={args.seq_len}), SGD lr={args.lr}, "
            f"{args.seeds} seeds per method")
    fig = plot_training(history, out / "rnn_exploding.png", reference_loss=MEAN_PREDICTOR_LOSS,
                        diverged_at=stops, smooth=smooth, title=what)
    fig2 = plot_training_details(history, out / "rnn_details.png", layers=layers,
                                 diverged_at=stops, smooth=smooth,
                                 title=what + ": gradient norms and clipping")
    import matplotlib.pyplot as plt

    plt.close(fig)
    plt.close(fig2)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--lr", type=float, default=None, help="default 0.1 (rnn), 0.5 (lstm)")
    p.add_argument("--seq-len", type=int, default=50)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cell", choices=("rnn", "lstm"), default="rnn")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help=f"comma list from {', '.join(ALL_METHODS)}")
    p.add_argument("--out", default="out/rnn")
    p.add_argument("--sweep", action="store_true", help="also sweep the learning rate")
    p.add_argument("--sweep-lrs", default="0.01,0.03,0.05,0.1,0.2,0.5")
    p.add_argument("--sweep-steps", type=int, default=600)
    p.add_argument("--sweep-methods", default="none,global_norm,value,agc")
    p.add_argument("--jobs", type=int, default=2, help="methods trained at once (threads)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    p.add_argument("--table", metavar="SUMMARY_JSON",
                   help="print the markdown table of outcomes of a summary.json and exit")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 0.5 if args.cell == "lstm" else 0.1
    if args.quick:
        args.steps, args.seeds, args.seq_len, args.hidden = 60, 2, 10, 16
        args.sweep_steps, args.sweep_lrs = 30, "0.03,0.3"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods + [m.strip() for m in args.sweep_methods.split(",")]:
        if m not in ALL_METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
    args.methods = methods
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chunk = max(1, min(100, args.steps // 10))
    seeds = np.arange(args.seeds)
    t0 = time.time()
    runs, history = [], {}
    bar = tqdm(total=args.steps * len(args.methods), desc="training", unit="step",
               disable=os.environ.get("OPTCLIP_NO_BAR") == "1")

    def train_method(m):
        trainer = Trainer(m, args.cell, args.hidden, args.seq_len, args.batch, chunk)
        return trainer.train(seeds, np.full(len(seeds), args.lr), args.steps, bar)

    # XLA releases the GIL: two methods at a time keep both cores of a small machine busy
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for m, hist in zip(args.methods, pool.map(train_method, args.methods), strict=True):
            history[m] = hist
            runs += summarise(m, seeds, hist)
    bar.close()
    config = {k: v for k, v in vars(args).items() if k not in ("out", "table")}
    config["clippers"] = {m: CLIPPER_SETTINGS[m] for m in args.methods}
    config["task"] = "adding problem; MSE; fresh batch each step; plain SGD"
    config["mean_predictor_loss"] = MEAN_PREDICTOR_LOSS
    summary = {"config": config, "runs": runs}
    np.savez_compressed(out / "history.npz", **{
        f"{m}/{k}": v for m, h in history.items() for k, v in h.items() if k != "layers"},
        **{f"{m}/layers/{n}": v for m, h in history.items() for n, v in h["layers"].items()})
    draw(history, runs, args, out)
    print_table(runs, args.methods)

    if args.sweep:
        lrs = [float(x) for x in args.sweep_lrs.split(",")]
        sweep_methods = [m.strip() for m in args.sweep_methods.split(",")]
        grid_lr = np.repeat(lrs, len(seeds))
        grid_seed = np.tile(seeds, len(lrs))
        frac, final = {}, {}
        sweep_runs = []
        bar = tqdm(total=args.sweep_steps * len(sweep_methods), desc="lr sweep", unit="step",
                   disable=os.environ.get("OPTCLIP_NO_BAR") == "1")

        def sweep_method(m):
            trainer = Trainer(m, args.cell, args.hidden, args.seq_len, args.batch,
                              max(1, min(100, args.sweep_steps // 6)))
            return trainer.train(grid_seed, grid_lr, args.sweep_steps, bar)

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            hists = list(pool.map(sweep_method, sweep_methods))
        for m, hist in zip(sweep_methods, hists, strict=True):
            rs = summarise(m, grid_seed, hist, lr=grid_lr)
            sweep_runs += rs
            frac[m] = [np.mean([r["diverged"] for r in rs if r["lr"] == lr]) for lr in lrs]
            final[m] = [np.median([r["final_loss"] for r in rs if r["lr"] == lr
                                   and r["final_loss"] is not None] or [math.nan]) for lr in lrs]
        bar.close()
        plot_divergence_sweep(lrs, frac, out / "rnn_sweep.png", final_loss=final,
                              title=f"{args.cell.upper()}, adding problem, "
                                    f"{args.sweep_steps} SGD steps, {len(seeds)} seeds per lr")
        summary["sweep"] = {"lrs": lrs, "steps": args.sweep_steps, "runs": sweep_runs,
                            "fraction_diverged": frac, "median_final_loss": final}
        print("\nlearning-rate sweep: fraction of seeds diverged")
        print(f"{'method':<12} " + " ".join(f"{lr:>7g}" for lr in lrs))
        for m in sweep_methods:
            print(f"{m:<12} " + " ".join(f"{f:>7.0%}" for f in frac[m]))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nwrote {out / 'rnn_exploding.png'}, {out / 'rnn_details.png'}, "
          f"{out / 'summary.json'}"
          + (f", {out / 'rnn_sweep.png'}" if args.sweep else "")
          + f" in {time.time() - t0:.0f} s")
    return summary


if __name__ == "__main__":
    main()
