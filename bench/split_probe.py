"""Diagnostic: would the per-leaf gather (``norms._split_gathered``) pay on an accelerator?

optclip hands each array its per-unit results by a gather with constant indices on XLA:CPU
only (``lax.platform_dependent`` in ``norms.split_flat``), and by slices elsewhere. This probe
forces one or the other on whatever backend it runs on (the gather as shipped on XLA:CPU,
from the vector written out by ``norms._written_out``; ``split_flat`` only: the overflow
rescue's scales for large arrays, ``norms._reduce_packed``, keep the shipped choice), and
measures

* ``compile``: the first call of one clipper's ``update`` alone on a many-leaves tree, after
  a warm-up compile of a tiny tree, with its kernel counts (run it once per clipper and
  mode, each in its own process, so that no compile cache or earlier compile helps the
  next);
* ``step``: the chain + adam step time of the per-unit clippers with either split, interleaved
  and donated as ``python -m bench`` times them, with the global-norm chain beside them.

    python -m bench.split_probe compile --tree many1000 --clipper agc --split gather
    python -m bench.split_probe step [--trees gpt2,resnet50] [--reps 10] [--steps 20]

Up to commit 93d58f9 the CPU path was a selection by mask, block by block
(``norms._split_selected``, since removed); the logs in ``bench/results/h200_2f30d35/``
measured that selection, as ``--split select``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import jax
import jax.numpy as jnp

from bench import trees
from bench.clippers import entries
from bench.compile_probe import fused_counts
from bench.run import Measured, _copy, temp_bytes, time_group, train_step
from bench.worker import compile_update
from optclip import norms as _n


@contextlib.contextmanager
def split(how: str):
    """While tracing: per-unit results reach their arrays by ``how``: "gather" (as shipped on
    XLA:CPU: from the vector written out by ``norms._written_out``, a ``lax.cond``),
    "gather_plain" (the gather alone), "slice", or "default" (as shipped: the gather on
    XLA:CPU only)."""
    real = _n.split_flat

    def forced(flat, lay):
        if how == "default" or not jnp.issubdtype(flat.dtype, jnp.floating):
            return real(flat, lay)
        if how == "gather":  # as shipped on XLA:CPU: the vector written out first
            return _n._split_gathered(_n._written_out(flat), lay)
        if how == "gather_plain":
            return _n._split_gathered(flat, lay)
        return _n._split_sliced(flat, lay)

    _n.split_flat = forced
    try:
        yield
    finally:
        _n.split_flat = real


def compile_main(args) -> None:
    # warm-up, as bench.compile_probe does: a process's first compile pays one-off costs
    tiny = trees.abstract_tree(trees.TREES["tiny"]())
    warm = entries()["adam"].chain()
    train_step(warm).lower(tiny, jax.eval_shape(warm.init, tiny), tiny).compile()
    tree = trees.abstract_tree(trees.TREES[args.tree]())
    tx = entries()[args.clipper].alone()
    with split(args.split):
        lower_s, compile_s, temp, hlo = compile_update(tx, tree, hlo=True)
    n, d = fused_counts(hlo)
    print(f"compile {args.tree} {args.clipper} split={args.split} on "
          f"{jax.devices()[0].platform}: lower {lower_s:.2f} s, compile {compile_s:.2f} s, "
          f"first call {lower_s + compile_s:.2f} s, temp {temp}, fused {n}, distinct {d}",
          flush=True)


def step_main(args) -> None:
    reg = entries()
    steps = args.steps or (1 if jax.devices()[0].platform == "cpu" else 20)
    print("device", jax.devices()[0], "jax", jax.__version__, "steps per turn", steps,
          flush=True)
    for tname in args.trees.split(","):
        shapes = trees.TREES[tname]()
        params = trees.make_tree(shapes, seed=1, scale=0.1)
        grads = trees.make_tree(shapes, seed=0)
        p_s = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        ms = []
        for name in ["adam", "clip_by_global_norm"] + args.clippers.split(","):
            for how in (("default",) if name in ("adam", "clip_by_global_norm")
                        else args.splits.split(",")):
                tx = reg[name].chain()
                s_s = jax.eval_shape(tx.init, p_s)
                t0 = time.perf_counter()
                with split(how):
                    low = train_step(tx).lower(p_s, s_s, p_s)
                c = low.compile()
                key = name if how == "default" else f"{name}/{how}"
                print(f"{tname} {key}: first call {time.perf_counter() - t0:.2f} s, "
                      f"temp {temp_bytes(c)}", flush=True)
                ms.append(Measured(key, c, lambda tx=tx, p=params: (_copy(p), tx.init(p)),
                                   (grads,)))
        times = time_group(ms, args.reps, 3, steps)
        med = {n: statistics.median(t) for n, t in times.items()}
        gn = med["clip_by_global_norm"]
        for m in ms:
            n = m.key
            print(f"{tname} {n:28s} {med[n] * 1e3:8.3f} ms  / adam {med[n] / med['adam']:.3f}"
                  f"  / GN chain {med[n] / gn:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile")
    c.add_argument("--tree", default="many1000")
    c.add_argument("--clipper", default="clip_by_leaf_norm")
    c.add_argument("--split", default="default",
                   choices=("default", "gather", "gather_plain", "slice"))
    s = sub.add_parser("step")
    s.add_argument("--trees", default="gpt2,resnet50")
    s.add_argument("--clippers", default="clip_by_leaf_norm,agc")
    s.add_argument("--reps", type=int, default=10)
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--splits", default="slice,gather",
                   help="comma list of gather, gather_plain, slice for the per-unit clippers")
    args = ap.parse_args()
    (compile_main if args.cmd == "compile" else step_main)(args)


if __name__ == "__main__":
    main()
