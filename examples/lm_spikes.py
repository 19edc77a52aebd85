"""Loss spikes in a small byte-level transformer, with and without clipping.

A 2-layer causal transformer (Flax nnx, d=64, 4 heads, context 64) learns to
predict the next byte of Python's own standard library: the ``.py`` files
next to ``os.py`` in the running interpreter, no download. Every tenth file
(sorted by name) is held out. The optimizer is AdamW (b1=0.9, b2=0.999,
weight decay 0.1) with a short warm-up to a high peak learning rate and a
cosine decay.

Spikes come from data glitches, as in real pre-training: on about 2% of the
steps (the same steps for every method of a seed) the whole batch is replaced
by junk, each sequence either one byte repeated (a run of "=" or a null-filled
blob) or random bytes. A glitch step's own loss is high by construction and is
not counted; a *loss spike* is a clean step whose training loss is above 1.5x
the median of the previous 50 clean steps (spike steps closer than 20 apart
count as one spike). That is the damage the glitch did to the model.

Two scenarios:

* ``base``: the setting above.
* ``drift``: the same, with the loss multiplied by a factor that grows from
  1e-2 to 1e2 over training (log-linear), so the gradient norm drifts by four
  orders of magnitude, as norms do over long pre-training runs. AdamW itself is
  nearly blind to the factor; a fixed clipping threshold is not: 1.0 is far
  above the norm early (it never clips, glitches pass) and far below it late
  (it clips every step). An adaptive clipper follows the norm.

Run:  python examples/lm_spikes.py            (about 4 minutes on 2 CPU cores)
      python examples/lm_spikes.py --quick    (seconds; for tests)
      python examples/lm_spikes.py --table docs/lm_summary.json   (the README table)
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
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

ALL_METHODS = ("none", "global_norm", "zclip", "adagc", "autoclip", "skip_on_spike",
               "zclip+skip_nonfinite")
SCENARIOS = ("base", "drift")
VOCAB = 256
SPIKE_RATIO, SPIKE_WINDOW, SPIKE_GAP = 1.5, 50, 20

SETTINGS = {
    "none": "adamw alone",
    "global_norm": "chain(clip_by_global_norm(1.0), adamw)",
    "zclip": "chain(zclip(), adamw)",
    "adagc": "chain(adagc(), adamw)",
    "autoclip": "chain(autoclip(10.0), adamw)",
    "skip_on_spike": "skip_on_spike(adamw, z_thresh=4.0, alpha=0.97, warmup_steps=25)",
    "zclip+skip_nonfinite": "skip_nonfinite(chain(zclip(), adamw))",
}


def make_tx(method: str, lr) -> optax.GradientTransformation:
    """The optimizer each method name stands for (see SETTINGS)."""
    adamw = optax.adamw(lr, b1=0.9, b2=0.999, weight_decay=0.1)
    if method == "none":
        return adamw
    if method == "skip_on_spike":
        return optclip.skip_on_spike(adamw, z_thresh=4.0, alpha=0.97, warmup_steps=25)
    if method == "zclip+skip_nonfinite":
        return optclip.skip_nonfinite(optax.chain(optclip.zclip(), adamw))
    clipper = {"global_norm": lambda: optclip.clip_by_global_norm(1.0),
               "zclip": lambda: optclip.zclip(),
               "adagc": lambda: optclip.adagc(),
               "autoclip": lambda: optclip.autoclip(10.0)}[method]()
    return optax.chain(clipper, adamw)


# ---------------------------------------------------------------------------- data

def load_stdlib(max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """The interpreter's own top-level ``.py`` files as bytes: (train, held-out, info)."""
    root = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    train, held = [], []
    for i, f in enumerate(files):
        (held if i % 10 == 9 else train).append(Path(f).read_bytes())
    tr = np.frombuffer(b"\n".join(train), np.uint8)
    he = np.frombuffer(b"\n".join(held), np.uint8)
    if max_bytes:
        tr, he = tr[:max_bytes], he[:max(max_bytes // 9, 4096)]
    info = {"root": root, "files": len(files), "train_bytes": int(tr.size),
            "heldout_bytes": int(he.size), "heldout_rule": "every 10th file, sorted by name"}
    return tr, he, info


def sample(key, data, batch: int, ctx: int):
    """``batch`` random windows of ``ctx + 1`` bytes."""
    starts = jax.random.randint(key, (batch,), 0, data.shape[0] - ctx - 1)
    win = jax.vmap(lambda s: jax.lax.dynamic_slice(data, (s,), (ctx + 1,)))(starts)
    return win.astype(jnp.int32)


def glitch(key, batch: int, ctx: int):
    """A junk batch: each sequence one repeated byte or uniform random bytes."""
    kb, kr, kc = jax.random.split(key, 3)
    const = jnp.broadcast_to(jax.random.randint(kb, (batch, 1), 0, VOCAB), (batch, ctx + 1))
    rand = jax.random.randint(kr, (batch, ctx + 1), 0, VOCAB)
    return jnp.where(jax.random.bernoulli(kc, 0.5, (batch, 1)), const, rand)


# ---------------------------------------------------------------------------- model

class Block(nnx.Module):
    def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
        self.proj = nnx.Linear(d, d, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)
        self.heads = heads

    def __call__(self, x):
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
        shape = (b, t, self.heads, d // self.heads)
        a = jax.nn.dot_product_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape),
                                         is_causal=True)
        x = x + self.proj(a.reshape(b, t, d))
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class LM(nnx.Module):
    def __init__(self, d: int, layers: int, heads: int, ctx: int, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, d, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (ctx, d)))
        self.blocks = nnx.List([Block(d, heads, rngs) for _ in range(layers)])
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


# ---------------------------------------------------------------------------- training

def _record(method: str, opt_state, grads) -> dict:
    """What the clipper or guard saw and did this step, from optclip.stats (no second pass)."""
    if method == "none":  # no clipper in the state: optclip.stats would warn
        return {"grad_norm": optclip.global_norm(grads), "acted": jnp.zeros((), bool),
                "threshold": jnp.full((), jnp.nan)}
    s = optclip.stats(opt_state, prefix=True)
    norm = next(v for k, v in s.items() if k.endswith("/grad_norm"))
    # the threshold that decides (zclip's, not the non-finite guard's around it)
    threshold = next(v for k, v in s.items() if k.endswith("/threshold")
                     and not k.startswith("skip_nonfinite/"))
    acted = jnp.zeros((), bool)
    for k, v in s.items():
        if k.endswith("/clipped") or k.endswith("/skipped"):
            acted = acted | v
    return {"grad_norm": norm, "acted": acted, "threshold": threshold}


@functools.cache
def _evaluator(d: int, layers: int, heads: int, ctx: int):
    """The held-out loss of each seed's parameters, jitted once for all methods."""
    graphdef, _, rest = nnx.split(LM(d, layers, heads, ctx, nnx.Rngs(0)), nnx.Param, ...)

    def loss_fn(params, tokens):
        logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def evaluate(params, tokens):
        return jax.vmap(lambda p: jax.lax.map(lambda tk: loss_fn(p, tk), tokens).mean())(params)

    return jax.jit(evaluate)


class Trainer:
    """One jitted, seed-vmapped chunk of training per method, compiled once."""

    def __init__(self, method: str, cfg: argparse.Namespace, steps: int, drift: bool):
        self.method, self.cfg, self.steps = method, cfg, steps
        model = LM(cfg.d, cfg.layers, cfg.heads, cfg.ctx, nnx.Rngs(0))
        self.graphdef, _, self.rest = nnx.split(model, nnx.Param, ...)
        warm = max(1, int(0.05 * steps))
        self.lr = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warm, steps, cfg.lr / 10)
        tx = make_tx(method, self.lr)
        self.tx = tx
        lo, hi = (-2.0, 2.0) if drift else (0.0, 0.0)

        def loss_fn(params, tokens):
            model = nnx.merge(self.graphdef, params, self.rest)
            logits = model(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        def step(carry, inp):
            params, opt_state = carry
            key, t, data = inp["key"], inp["t"], inp["data"]
            kd, kg, kj = jax.random.split(key, 3)
            is_glitch = jax.random.bernoulli(kg, cfg.glitch_prob)
            tokens = jnp.where(is_glitch, glitch(kj, cfg.batch, cfg.ctx),
                               sample(kd, data, cfg.batch, cfg.ctx))
            scale = 10.0 ** (lo + (hi - lo) * t / steps)
            weight = scale * jnp.where(is_glitch, cfg.glitch_weight, 1.0)
            loss, grads = jax.value_and_grad(lambda p: weight * loss_fn(p, tokens))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            rec = {"loss": loss / weight, "glitch": is_glitch, **_record(method, opt_state, grads)}
            return (params, opt_state), rec

        def run_chunk(params, opt_state, keys, ts, data):
            def body(c, x):
                return step(c, {**x, "data": data})

            (params, opt_state), hist = jax.lax.scan(body, (params, opt_state),
                                                     {"key": keys, "t": ts})
            return params, opt_state, hist

        self.run_chunk = jax.jit(jax.vmap(run_chunk, in_axes=(0, 0, 0, None, None)),
                                 donate_argnums=(0, 1))

        self.evaluate = _evaluator(cfg.d, cfg.layers, cfg.heads, cfg.ctx)

    def init(self, seeds):
        cfg = self.cfg

        def init_one(seed):
            m = LM(cfg.d, cfg.layers, cfg.heads, cfg.ctx, nnx.Rngs(jax.random.key(seed)))
            _, params, _ = nnx.split(m, nnx.Param, ...)
            return params, self.tx.init(params)

        return jax.jit(jax.vmap(init_one))(jnp.asarray(seeds))

    def train(self, seeds, train_data, eval_tokens, bar=None):
        params, opt_state = self.init(seeds)
        chunk = self.cfg.chunk
        data = jnp.asarray(train_data)
        keys = jax.vmap(lambda s: jax.random.split(
            jax.random.fold_in(jax.random.key(4321), s), self.steps))(jnp.asarray(seeds))
        hists = []
        for start in range(0, self.steps, chunk):
            n = min(chunk, self.steps - start)
            k = keys[:, start:start + chunk]
            ts = jnp.arange(start, start + chunk, dtype=jnp.float32)
            if n < chunk:  # keep one compiled shape: pad, then trim
                k = jnp.concatenate([k, k[:, :chunk - n]], axis=1)
            params, opt_state, hist = self.run_chunk(params, opt_state, k, ts, data)
            hists.append(jax.tree.map(lambda x, n=n: np.asarray(x)[:, :n], jax.device_get(hist)))
            if bar is not None:
                bar.update(n)
        hist = jax.tree.map(lambda *xs: np.concatenate(xs, axis=1), *hists)
        hist["heldout"] = np.asarray(self.evaluate(params, eval_tokens))
        return hist


# ---------------------------------------------------------------------------- analysis

def spike_steps(loss: np.ndarray, glitch: np.ndarray, ratio: float = SPIKE_RATIO,
                window: int = SPIKE_WINDOW, gap: int = SPIKE_GAP) -> list[int]:
    """Loss spikes of one run: the first step of each spike event.

    Over the clean steps only (glitch steps removed), a step whose loss is
    above ``ratio`` times the median of the previous ``window`` clean steps is
    a spike step; spike steps fewer than ``gap`` steps after the previous one
    belong to the same spike. A non-finite loss is a spike step.
    """
    idx = np.flatnonzero(~np.asarray(glitch, bool))
    clean = np.asarray(loss, np.float64)[idx]
    events: list[int] = []
    last = -10**9
    for j in range(window, len(clean)):
        med = np.median(clean[j - window:j])
        if not np.isfinite(clean[j]) or (np.isfinite(med) and clean[j] > ratio * med):
            step = int(idx[j])
            if step - last >= gap:
                events.append(step)
            last = step
    return events


def summarise(scenario: str, method: str, seeds, hist) -> list[dict]:
    runs = []
    for i, seed in enumerate(seeds):
        loss = np.asarray(hist["loss"][i], np.float64)
        g = np.asarray(hist["glitch"][i], bool)
        clean = loss[~g]
        first = clean[:10].mean()
        tail = clean[-50:]
        bad = ~np.isfinite(loss)
        diverged = bool(bad.any() or not np.isfinite(tail.mean()) or tail.mean() > first)
        spikes = spike_steps(loss, g)
        held = float(hist["heldout"][i])
        runs.append({
            "scenario": scenario, "method": method, "seed": int(seed),
            "spikes": len(spikes), "spike_steps": spikes,
            "diverged": diverged,
            "final_train_loss": float(tail.mean()) if np.isfinite(tail.mean()) else None,
            "heldout_loss": held if np.isfinite(held) else None,
            "acted_fraction": float(np.mean(hist["acted"][i])),
            "acted_on_glitch_fraction": float(np.mean(hist["acted"][i][g])) if g.any() else None,
            "glitch_steps": int(g.sum()),
            "max_grad_norm": float(np.nanmax(np.where(np.isfinite(hist["grad_norm"][i]),
                                                      hist["grad_norm"][i], np.nan))),
        })
    return runs


def table(summary: dict) -> str:
    """The markdown table of outcomes (what the README shows)."""
    cfg = summary["config"]
    lines = ["| scenario | method | loss spikes per seed | diverged | held-out loss (nats/byte) "
             "| steps clipped or skipped |", "|---|---|---|---|---|---|"]
    for sc in cfg["scenarios"]:
        for m in cfg["methods"]:
            rs = [r for r in summary["runs"] if r["scenario"] == sc and r["method"] == m]
            if not rs:
                continue
            sp = [r["spikes"] for r in rs]
            held = [r["heldout_loss"] for r in rs if r["heldout_loss"] is not None]
            div = sum(r["diverged"] for r in rs)
            acted = np.mean([r["acted_fraction"] for r in rs])
            name = "`" + cfg["clippers"][m] + "`" if m != "none" else "none (adamw alone)"
            hs = f"{np.mean(held):.3f} ({min(held):.3f}-{max(held):.3f})" if held else "-"
            lines.append(f"| {sc} | {name} | {np.mean(sp):.1f} ({', '.join(map(str, sp))}) "
                         f"| {div} of {len(rs)} | {hs} | "
                         + ("-" if m == "none" else f"{acted:.0%}") + " |")
    return "\n".join(lines)


def plot(summary: dict, history: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    from optclip.plotting import plot_lm_spikes

    cfg = summary["config"]
    rows = " and ".join(f"{s} ({'loss x 1e-2 to 1e2 over training' if s == 'drift' else 'top'})"
                        if s == "drift" else s for s in cfg["scenarios"])
    fig = plot_lm_spikes(summary, history, path, title=(
        f"Byte-level transformer ({cfg['layers']} layers, d={cfg['d']}, context {cfg['ctx']}) "
        f"on Python's standard library, AdamW peak lr {cfg['lr']:g}, {cfg['seeds']} seeds; "
        f"junk batches on {cfg['glitch_prob']:.0%} of steps (loss x{cfg['glitch_weight']:g})\n"
        f"rows: {rows}; a spike: a clean step's loss above {SPIKE_RATIO}x the median of the "
        f"previous {SPIKE_WINDOW}"))
    plt.close(fig)


# ---------------------------------------------------------------------------- main

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-2, help="AdamW's peak learning rate")
    p.add_argument("--glitch-prob", type=float, default=0.02)
    p.add_argument("--glitch-weight", type=float, default=50.0,
                   help="the loss weight of a glitch batch (1: plain junk)")
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--chunk", type=int, default=100)
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help=f"comma list from {', '.join(ALL_METHODS)}")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help="base (glitches at a high lr), drift (the same, the norm drifting 1e4x)")
    p.add_argument("--out", default="out/lm")
    p.add_argument("--jobs", type=int, default=2, help="methods trained at once (threads)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    p.add_argument("--table", metavar="SUMMARY_JSON",
                   help="print the markdown table of a summary.json and exit")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.d, args.batch, args.ctx, args.chunk = 80, 2, 32, 8, 32, 40
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in ALL_METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
    scen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for s in scen:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}; choose from {', '.join(SCENARIOS)}")
    args.methods, args.scenarios = methods, scen
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train_data, held_data, data_info = load_stdlib(4_000_000 if not args.quick else 400_000)
    n_eval = 8 if args.quick else 32
    eval_tokens = jnp.asarray(np.stack([
        np.stack([held_data[s:s + args.ctx + 1] for s in starts]) for starts in
        np.random.default_rng(0).integers(0, held_data.size - args.ctx - 1,
                                          (n_eval, 64))]).astype(np.int32))
    seeds = np.arange(args.seeds)
    jobs = [(s, m) for s in args.scenarios for m in args.methods]
    bar = tqdm(total=args.steps * len(jobs), desc="training", unit="step",
               disable=os.environ.get("OPTCLIP_NO_BAR") == "1")

    def train(job):
        sc, m = job
        return Trainer(m, args, args.steps, sc == "drift").train(seeds, train_data, eval_tokens,
                                                                 bar)

    runs, history = [], {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for (sc, m), hist in zip(jobs, pool.map(train, jobs), strict=True):
            history[(sc, m)] = hist
            runs += summarise(sc, m, seeds, hist)
    bar.close()
    config = {k: v for k, v in vars(args).items() if k not in ("out", "table")}
    config["clippers"] = {m: SETTINGS[m] for m in args.methods}
    config["data"] = data_info
    config["spike_rule"] = (f"a clean step's training loss above {SPIKE_RATIO}x the median of "
                            f"the previous {SPIKE_WINDOW} clean steps; spike steps within "
                            f"{SPIKE_GAP} steps are one spike; glitch steps are not counted")
    config["divergence_rule"] = ("a non-finite loss, or the mean clean loss of the last 50 "
                                 "clean steps above that of the first 10")
    config["drift"] = "loss x 10**(-2 + 4 t / steps) in the drift scenario"
    summary = {"config": config, "runs": runs}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    np.savez_compressed(out / "history.npz", **{
        f"{sc}/{m}/{k}": v for (sc, m), h in history.items() for k, v in h.items()})
    plot(summary, history, out / "lm_spikes.png")
    print()
    print(table(summary))
    print(f"\nspike rule: {config['spike_rule']}")
    print(f"\nwrote {out / 'lm_spikes.png'}, {out / 'summary.json'} in {time.time() - t0:.0f} s")
    return summary


if __name__ == "__main__":
    main()
