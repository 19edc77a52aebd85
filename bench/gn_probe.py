"""Diagnostic: where the global-norm chain's step time goes on a device.

Times, interleaved and donated as ``python -m bench`` does, chains with adam: adam alone;
the hand-fused clip (``fused``), and the same with a threshold it never reaches;
``clip_by_global_norm`` (``gn``) as shipped, and

* ``gn_noclip``: with a threshold it never reaches;
* ``gn_nocond``, ``gn_select``: its overflow rescue's ``lax.cond`` replaced by the fast branch
  alone, or by both branches and a select (diagnostics only: not overflow-safe);
* ``gn_traced``: its threshold a schedule XLA cannot fold;
* ``gn_onefactor``: one factor per leaf instead of ``static.clip_factors``' pair;
* ``gn_nobarrier``: the rescue's scaled squares with no optimization barrier (as at
  2def691).

(db906db also had ``gn_opaque``, in ``h200_2f30d35/gn_probe_2.log``: its barrier did not
keep the stats from being constants, so it measured nothing; and ``_pairbarrier`` variants,
the barrier that ships now. Both were removed.)

``adam_constout``: adam after a transformation whose state is two compile-time constants;
``agc``, with its overflow rescue's two ``lax.cond`` replaced by the fast branch (``agc_nocond``),
a hand-fused unit-wise AGC (``agc_fused``, ``clippers.fused_agc``: what an AGC costs) and
Optax's (``optax_agc``); ``leaf`` (``clip_by_leaf_norm``), ``value`` (``clip_by_value(0.1)``),
``optax_clip`` (``optax.clip(0.1)``), and a hand-fused clip by value with its norm and clamp
flag (``value_fused``, ``clippers.fused_value``), with only its norm or only its flag
(``value_norm``, ``value_max``: one reduction each), and with the two from one variadic
reduction (``value_onepass``); ``clip_by_value(0.01)``, which clamps a third
of the bench's gradients (``value_clamping``), and the hand-fused one that also takes the norm
after the clamp (``value_fused_after``); zclip, uncapped and capped at the chain's
threshold (``zclip_capped``: it then scales every step as the chain does); ``clippy`` after adam,
its hand-fused reference (``clippy_fused``) and the same with the global norm of the update,
the one stat that reads it again (``clippy_fused_norm``; ``clippy_fused_onepass`` takes it in
the same pass as the ratios' min); ``skip_nonfinite`` and Optax's
``apply_if_finite``. Prints each compiled
step's conditionals, fused kernels and temp bytes.

    python -m bench.gn_probe [--trees gpt2,resnet50] [--reps 25] [--steps 20] [--only a,b]
                             [--dump DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import optclip
from bench import clippers, trees
from bench.run import Measured, _copy, temp_bytes, time_group, train_step
from optclip import norms as _n
from optclip import static as _s


@contextlib.contextmanager
def no_cond(how: str = "fast"):
    """While tracing: ``lax.cond`` inside optclip.norms takes the false (fast) branch
    (``how="fast"``), or computes both branches and selects (``how="select"``)."""
    real = _n.lax

    class _Lax:
        def __getattr__(self, k):
            return getattr(real, k)

        @staticmethod
        def cond(pred, true_fn, false_fn, *ops):
            if how == "fast":
                return false_fn(*ops)
            return jax.tree.map(lambda a, b: jnp.where(pred, a, b), true_fn(*ops),
                                false_fn(*ops))

    _n.lax = _Lax()
    try:
        yield
    finally:
        _n.lax = real


@contextlib.contextmanager
def one_factor():
    """While tracing: clip_by_global_norm scales each leaf by one factor (their product), as
    before the pair of ``static.clip_factors``; not exact below 2^-126 on XLA:CPU."""
    real = _s.scale_tree

    def scale_tree(tree, factors):
        f = factors[..., 0] * factors[..., 1]
        return jax.tree.map(lambda x: x * f.astype(x.dtype) if _n.is_float_leaf(x) else x, tree)

    _s.scale_tree = scale_tree
    try:
        yield
    finally:
        _s.scale_tree = real


@contextlib.contextmanager
def no_barrier():
    """While tracing: the overflow rescue's scaled squares ``(v * c) ** 2`` (``norms.
    _scaled_terms``) are formed with no optimization barrier, as at 2def691 (NaN for a tree
    known at compile time). As shipped the barrier is on the pair ``(v, c)``; at 2f30d35 it
    was on the product ``v * c``, which XLA:GPU wrote out (``h200_2f30d35/gn_probe_1.log``)."""
    real = _n._scaled_terms

    def terms(v, scale, p):
        if p != 2:
            return real(v, scale, p)
        t = v * scale
        return t * t

    _n._scaled_terms = terms
    try:
        yield
    finally:
        _n._scaled_terms = real


def const_state() -> optax.GradientTransformation:
    """Passes the updates through, with a state of two scalars that are compile-time constants
    (as the global-norm chain's ``threshold`` and ``invalid_threshold`` stats were before
    04de5a2)."""
    return optax.GradientTransformation(
        lambda p: (jnp.zeros((), jnp.float32), jnp.zeros((), bool)),
        lambda u, s, p=None: (u, (jnp.ones((), jnp.float32), jnp.zeros((), bool))))


MODES = {"fast": lambda: no_cond("fast"), "select": lambda: no_cond("select"),
         "one_factor": one_factor, "no_barrier": no_barrier}


def variants():
    adam = clippers.adam
    return {
        "adam": (adam, False),
        "fused": (lambda: optax.chain(clippers.fused_clip_by_global_norm(1.0), adam()), False),
        "gn": (lambda: optax.chain(optclip.clip_by_global_norm(1.0), adam()), False),
        "gn_noclip": (lambda: optax.chain(optclip.clip_by_global_norm(1e30), adam()), False),
        "gn_nocond": (lambda: optax.chain(optclip.clip_by_global_norm(1.0), adam()), "fast"),
        "gn_select": (lambda: optax.chain(optclip.clip_by_global_norm(1.0), adam()), "select"),
        # the threshold traced (a schedule XLA cannot fold), as zclip's is: until 04de5a2 a
        # float threshold made two stats constant outputs, which cost the GPU (adam_constout)
        "gn_traced": (lambda: optax.chain(optclip.clip_by_global_norm(
            lambda count: jnp.where(count >= 0, 1.0, 2.0)), adam()), False),
        "gn_onefactor": (lambda: optax.chain(optclip.clip_by_global_norm(1.0), adam()),
                         "one_factor"),
        # the rescue's scaled squares with no barrier (2def691)
        "gn_nobarrier": (lambda: optax.chain(optclip.clip_by_global_norm(1.0), adam()),
                         "no_barrier"),
        # adam after two constant outputs
        "adam_constout": (lambda: optax.chain(const_state(), adam()), False),
        "agc": (lambda: optax.chain(optclip.agc(0.01), adam()), False),
        # what an AGC costs (clippers.fused_agc), and Optax's
        "agc_fused": (lambda: optax.chain(clippers.fused_agc(0.01), adam()), False),
        "agc_nocond": (lambda: optax.chain(optclip.agc(0.01), adam()), "fast"),
        "optax_agc": (lambda: optax.chain(optax.adaptive_grad_clip(0.01), adam()), False),
        "leaf": (lambda: optax.chain(optclip.clip_by_leaf_norm(1.0), adam()), False),
        "value": (lambda: optax.chain(optclip.clip_by_value(0.1), adam()), False),
        "optax_clip": (lambda: optax.chain(optax.clip(0.1), adam()), False),
        # what a clip by value with its norm and clamp flag costs (clippers.fused_value)
        "value_fused": (lambda: optax.chain(clippers.fused_value(0.1), adam()), False),
        # what each of its two stats costs alone (one extra read), and the two from one
        # variadic reduction over rows
        "value_norm": (lambda: optax.chain(clippers.fused_value(0.1, stats="norm"), adam()),
                       False),
        "value_max": (lambda: optax.chain(clippers.fused_value(0.1, stats="max"), adam()),
                      False),
        "value_onepass": (lambda: optax.chain(clippers.fused_value(0.1, stats="one_pass"),
                                              adam()), False),
        # clamping a third of the elements (the bench's clip_by_value_clamping), and its floor,
        # which also takes the norm after the clamp
        "value_clamping": (lambda: optax.chain(optclip.clip_by_value(0.01), adam()), False),
        "value_fused_after": (lambda: optax.chain(clippers.fused_value(0.01, norm_after=True),
                                                  adam()), False),
        "zclip": (lambda: optax.chain(optclip.zclip(warmup_steps=1), adam()), False),
        # zclip capped at the same threshold: it then scales every step as the global-norm
        # chain does, so a gap that stays between these two is in the code, not the data
        "zclip_capped": (lambda: optax.chain(optclip.zclip(warmup_steps=1, max_norm=1.0),
                                             adam()), False),
        "fused_noclip": (lambda: optax.chain(clippers.fused_clip_by_global_norm(1e30), adam()),
                         False),
        # update-space clipping after adam, and its hand-fused reference
        "clippy": (lambda: optax.chain(adam(), optclip.clippy(0.1, 1e-7)), False),
        "clippy_fused": (lambda: optax.chain(adam(), clippers.fused_clippy(0.1, 1e-7)), False),
        # the same with the global norm of the update, the stat that reads it again
        "clippy_fused_norm": (lambda: optax.chain(
            adam(), clippers.fused_clippy(0.1, 1e-7, norm=True)), False),
        # and with the min and the sum of squares taken in one pass (a variadic reduce)
        "clippy_fused_onepass": (lambda: optax.chain(
            adam(), clippers.fused_clippy(0.1, 1e-7, norm="one_pass")), False),
        # the guards, and Optax's
        "skip_nonfinite": (lambda: optclip.skip_nonfinite(adam()), False),
        "apply_if_finite": (lambda: optax.apply_if_finite(adam(), 10**9), False),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trees", default="gpt2,resnet50")
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--only", default="")
    ap.add_argument("--dump", default="",
                    help="a folder: each variant's compiled step is written there as text")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps back to back per turn, one wait at the end (default 1 on "
                         "CPU, 20 on an accelerator)")
    args = ap.parse_args()
    steps = args.steps or (1 if jax.devices()[0].platform == "cpu" else 20)
    print("device", jax.devices()[0], "jax", jax.__version__, "steps per turn", steps,
          flush=True)
    for tname in args.trees.split(","):
        shapes = trees.TREES[tname]()
        params = trees.make_tree(shapes, seed=0)
        grads = trees.make_tree(shapes, seed=1)
        p_s = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        ms = []
        vs = variants()
        if args.only:
            vs = {k: v for k, v in vs.items() if k in args.only.split(",")}
        for name, (make, nc) in vs.items():
            tx = make()
            s_s = jax.eval_shape(tx.init, p_s)
            ctx = MODES[nc]() if nc else contextlib.nullcontext()
            with ctx:
                low = train_step(tx).lower(p_s, s_s, p_s)
            c = low.compile()
            txt = c.as_text()
            entry = txt.split("ENTRY")[-1]
            if args.dump:
                Path(args.dump).mkdir(parents=True, exist_ok=True)
                (Path(args.dump) / f"{tname}_{name}.txt").write_text(txt)
            print(f"{tname} {name}: conditionals {txt.count(' conditional(')}, entry fusions "
                  f"{entry.count(' fusion(')}, temp {temp_bytes(c)}", flush=True)
            ms.append(Measured(name, c, lambda tx=tx, p=params: (_copy(p), tx.init(p)),
                               (grads,)))
        names = [m.key for m in ms]
        times = time_group(ms, args.reps, 3, steps)
        med = {n: statistics.median(t) for n, t in times.items()}
        for n in names:
            print(f"{tname} {n:10s} {med[n] * 1e3:8.3f} ms  / adam {med[n] / med['adam']:.3f}"
                  + (f"  / fused {med[n] / med['fused']:.3f}" if "fused" in med else ""),
                  flush=True)


if __name__ == "__main__":
    main()
