"""optclip's benchmark: step time and compile time, side by side with Optax and the memory floor.

Everything is measured in one process, one configuration after another, and
reported as medians and as *ratios* to a baseline measured in the same run
(the machines are shared and noisy: absolute times mean little).

Run:  python -m bench                 (GPT-2 and ResNet-50 trees, many-leaves compile times)
      python -m bench --quick         (tiny trees, seconds; what the test suite runs)
      python -m bench --trees gpt2 --reps 7 --out bench/results
It runs unchanged on a GPU: JAX's default device is used (``--backend`` picks another).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optclip

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from trees import TREES, make_tree, n_params  # type: ignore[no-redef]
else:
    from bench.trees import TREES, make_tree, n_params


def _block(x):
    return jax.block_until_ready(x)


def compile_time(fn: Callable, *args) -> tuple[Any, float]:
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def step_time(compiled, carry: tuple, rest: tuple, reps: int, warmup: int = 1,
              chain: bool = True) -> float:
    """Median seconds of ``carry = compiled(*carry, *rest)``, chaining (donated) carries."""
    times = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        out = _block(compiled(*carry, *rest))
        dt = time.perf_counter() - t0
        if chain:
            carry = out if isinstance(out, tuple) else (out,)
        if i >= warmup:
            times.append(dt)
    return statistics.median(times)


def temp_bytes(compiled) -> int | None:
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


# ---- what is measured -------------------------------------------------------------------------

def clip_fns() -> dict[str, tuple[Callable[[], optax.GradientTransformation], str | None]]:
    """name -> (optclip factory, the Optax counterpart's name)."""
    return {
        "clip_by_global_norm": (lambda: optclip.clip_by_global_norm(1.0), "optax_global_norm"),
        "clip_by_value": (lambda: optclip.clip_by_value(1e-3), "optax_clip"),
        "clip_by_block_rms": (lambda: optclip.clip_by_block_rms(1e-3), "optax_block_rms"),
        "clip_by_leaf_norm": (lambda: optclip.clip_by_leaf_norm(1.0), None),
        "agc": (lambda: optclip.agc(0.01), "optax_agc"),
        "autoclip": (lambda: optclip.autoclip(10.0), None),
        "autoclip_w1000": (lambda: optclip.autoclip(10.0, history=1000), None),
        "zclip": (lambda: optclip.zclip(warmup_steps=1), None),
        "adagc": (lambda: optclip.adagc(warmup_steps=1), None),
    }


OPTAX = {
    "optax_global_norm": lambda: optax.clip_by_global_norm(1.0),
    "optax_clip": lambda: optax.clip(1e-3),
    "optax_block_rms": lambda: optax.clip_by_block_rms(1e-3),
    "optax_agc": lambda: optax.adaptive_grad_clip(0.01),
}


def bench_tree(name: str, reps: int, full: bool) -> dict:
    shapes = TREES[name]()
    grads = make_tree(shapes, seed=0)
    params = make_tree(shapes, seed=1, scale=0.1)
    res: dict[str, Any] = {"tree": name, "leaves": len(shapes), "params": n_params(shapes),
                           "step_s": {}, "compile_s": {}, "temp_bytes": {}}

    def record(key, fn, carry, rest, donate_carry=True, chain=True):
        compiled, ct = compile_time(fn, *carry, *rest)
        res["compile_s"][key] = ct
        res["temp_bytes"][key] = temp_bytes(compiled)
        if full:
            copy = jax.tree.map(jnp.copy, carry) if donate_carry else carry
            res["step_s"][key] = step_time(compiled, copy, rest, reps, chain=chain)
        print(f"  {name:>10} {key:<42} compile {ct:7.2f} s"
              + (f"   step {res['step_s'][key] * 1e3:9.2f} ms" if full else ""), flush=True)

    # memory floors: read once; read and write once, in place
    read = jax.jit(lambda g: sum(jnp.sum(x) for x in jax.tree.leaves(g)))
    record("floor_read", read, (grads,), (), donate_carry=False, chain=False)
    rw = jax.jit(lambda g: jax.tree.map(lambda x: x * 0.999, g), donate_argnums=0)
    record("floor_read_write", rw, (grads,), ())

    # each clipper alone, donated (the updates replace the gradients in place)
    def clip_alone(tx):
        def f(g, s, p):
            return tx.update(g, s, p)
        return jax.jit(f, donate_argnums=(0, 1))

    def clip_alone_step(tx):
        f = clip_alone(tx)
        state = tx.init(params)
        return f, (grads, state)

    for key, (make, counterpart) in clip_fns().items():
        f, carry = clip_alone_step(make())
        record(f"alone/{key}", f, carry, (params,))
        if counterpart:
            f, carry = clip_alone_step(OPTAX[counterpart]())
            record(f"alone/{counterpart}", f, carry, (params,))

    # chain(clipper, adam) against adam alone; donated params and state, and not donated
    def train_step(tx, donate):
        def f(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s
        return jax.jit(f, donate_argnums=(0, 1) if donate else ())

    chains = {"adam": optax.adam(1e-3)}
    for key, (make, counterpart) in clip_fns().items():
        chains[f"{key}+adam"] = optax.chain(make(), optax.adam(1e-3))
        if counterpart == "optax_global_norm":
            chains["optax_global_norm+adam"] = optax.chain(OPTAX[counterpart](), optax.adam(1e-3))
    for donate in (True, False):
        for key, tx in chains.items():
            if not donate and key not in ("adam", "clip_by_global_norm+adam",
                                          "optax_global_norm+adam"):
                continue
            f = train_step(tx, donate)
            tag = "donated" if donate else "not_donated"
            record(f"chain/{tag}/{key}", f, (params, tx.init(params)), (grads,),
                   donate_carry=donate)
    return res


def bench_compile_only(name: str, with_optax: bool) -> dict:
    """Compile times on a tree of many small leaves (the step time is negligible there)."""
    shapes = TREES[name]()
    grads = make_tree(shapes)
    res: dict[str, Any] = {"tree": name, "leaves": len(shapes), "params": n_params(shapes),
                           "compile_s": {}}

    def record(key, fn, *args):
        _, ct = compile_time(jax.jit(fn), *args)
        res["compile_s"][key] = ct
        print(f"  {name:>10} {key:<42} compile {ct:7.2f} s", flush=True)

    record("optclip.global_norm", optclip.global_norm, grads)
    if with_optax:
        record("optax.global_norm", optax.global_norm, grads)

    def step(tx):
        def f(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s
        return f, tx.init(grads)

    txs = {"adam": optax.adam(1e-3),
           "clip_by_global_norm+adam": optax.chain(optclip.clip_by_global_norm(1.0),
                                                   optax.adam(1e-3))}
    if with_optax:
        txs["optax_global_norm+adam"] = optax.chain(optax.clip_by_global_norm(1.0),
                                                    optax.adam(1e-3))
    for key, tx in txs.items():
        f, s = step(tx)
        record(f"chain/{key}", f, grads, s, grads)
    return res


# ---- report -----------------------------------------------------------------------------------

def ratios(res: dict) -> dict[str, float]:
    st = res.get("step_s", {})
    out: dict[str, float] = {}
    if not st:
        return out
    rw = st["floor_read_write"]
    for key, v in st.items():
        if key.startswith("alone/"):
            out[f"{key} / read+write floor"] = v / rw
    for key, (_, counterpart) in clip_fns().items():
        if counterpart and f"alone/{counterpart}" in st:
            out[f"alone: optclip {key} / {counterpart}"] = st[f"alone/{key}"] / \
                st[f"alone/{counterpart}"]
    for tag in ("donated", "not_donated"):
        adam = st.get(f"chain/{tag}/adam")
        for key, v in st.items():
            if key.startswith(f"chain/{tag}/") and not key.endswith("/adam"):
                out[f"{key} / adam"] = v / adam
    gn = st.get("chain/donated/clip_by_global_norm+adam")
    for key, v in st.items():
        if key.startswith("chain/donated/") and key.split("/")[-1] not in (
                "adam", "clip_by_global_norm+adam", "optax_global_norm+adam"):
            out[f"{key} / clip_by_global_norm+adam"] = v / gn
    return out


def markdown(results: list[dict]) -> str:
    lines = []
    for res in results:
        lines.append(f"\n### {res['tree']}: {res['leaves']} leaves, "
                     f"{res['params'] / 1e6:.1f}M params\n")
        lines.append("| measurement | median step (ms) | compile (s) | ratio |")
        lines.append("|---|---:|---:|---|")
        rat = ratios(res)
        st = res.get("step_s", {})
        for key, ct in res["compile_s"].items():
            ms = f"{st[key] * 1e3:.2f}" if key in st else "-"
            rel = "; ".join(f"{v:.2f}x {k.split(' / ')[1]}" for k, v in rat.items()
                            if k.split(" / ")[0] == key)
            lines.append(f"| {key} | {ms} | {ct:.2f} | {rel} |")
        if "chain/adam" in res["compile_s"]:
            base = res["compile_s"]["chain/adam"]
            for key, ct in res["compile_s"].items():
                if key.startswith("chain/") and key != "chain/adam":
                    lines.append(f"| compile {key} / adam | | | {ct / base:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny trees; seconds")
    p.add_argument("--trees", default=None, help="comma list (default: gpt2,resnet50)")
    p.add_argument("--compile-trees", default=None,
                   help="many-leaves trees for compile times (default: leaves1000..10000)")
    p.add_argument("--optax-compile-max-leaves", type=int, default=2000,
                   help="skip Optax's compile above this many leaves (it grows superlinearly)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--backend", default=None, help="cpu, gpu, tpu (default: JAX's default)")
    p.add_argument("--out", default=None, help="directory for results.json and results.md")
    args = p.parse_args(argv)
    if args.backend:
        jax.config.update("jax_platforms", args.backend)
    trees = (args.trees or ("tiny" if args.quick else "gpt2,resnet50")).split(",")
    if args.compile_trees is None:
        args.compile_trees = ("tiny_leaves" if args.quick else
                              "leaves1000,leaves2000,leaves4000,leaves10000")
    ctrees = args.compile_trees.split(",")
    ctrees = [t for t in ctrees if t]
    print(f"jax {jax.__version__}, optax {optax.__version__}, device {jax.devices()[0]}, "
          f"{platform.machine()}", flush=True)
    results = [bench_tree(t, args.reps, full=True) for t in trees]
    for t in ctrees:
        results.append(bench_compile_only(
            t, with_optax=len(TREES[t]()) <= args.optax_compile_max_leaves))
    md = markdown(results)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"jax": jax.__version__, "optax": optax.__version__,
                "device": str(jax.devices()[0]), "argv": sys.argv[1:]}
        (out / "results.json").write_text(json.dumps({"meta": meta, "results": results,
                                                      "ratios": [ratios(r) for r in results]},
                                                     indent=1))
        (out / "results.md").write_text(md + "\n")
    return results


if __name__ == "__main__":
    main()
