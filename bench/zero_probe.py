"""Diagnostic: what all-zero leaves (frozen or unused parameters) cost each clipper's step.

An all-zero unit's sum of squares is 0, below the sum under which a norm's small terms may
have been lost, so it asks for the norms' overflow rescue at every step (``norms.norm_core``).
This times, interleaved and donated as ``python -m bench`` does, each chain with adam on
the same gradients twice: as drawn, and with every fourth leaf set to zero (a quarter of
the leaves, large and small alike, as a model with frozen layers has). It prints each
chain's step with the zeros over its step without them; adam alone is the control: its
arithmetic is the same whatever the values, yet XLA:CPU ran it at 0.84-0.85x on the zeros
(``bench/results/cpu_zero_leaves/``), so read each chain's ratio against adam's.

    python -m bench.zero_probe [--trees gpt2,resnet50] [--reps 15] [--steps 1]
                               [--only adam,clip_by_leaf_norm,...]
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp

from bench import clippers, trees
from bench.run import Measured, _copy, time_group, train_step

NAMES = ("adam", "clip_by_global_norm", "clip_by_leaf_norm", "clip_by_block_rms", "agc",
         "adagc", "clippy")


def with_zero_leaves(grads, every: int = 4):
    """``grads`` with every ``every``-th leaf (in tree order) set to zero."""
    leaves, treedef = jax.tree.flatten(grads)
    return treedef.unflatten([jnp.zeros_like(x) if i % every == 0 else x
                              for i, x in enumerate(leaves)])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trees", default="gpt2,resnet50")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--only", default=",".join(NAMES))
    ap.add_argument("--steps", type=int, default=None,
                    help="steps back to back per turn (default 1 on CPU, 20 on an accelerator)")
    args = ap.parse_args(argv)
    steps = args.steps or (1 if jax.devices()[0].platform == "cpu" else 20)
    print("device", jax.devices()[0], "jax", jax.__version__, "steps per turn", steps,
          flush=True)
    reg = clippers.entries()
    for tname in args.trees.split(","):
        shapes = trees.TREES[tname]()
        params = trees.make_tree(shapes, seed=0)
        grads = trees.make_tree(shapes, seed=1)
        zeros = with_zero_leaves(grads)
        p_s = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        ms = []
        for name in args.only.split(","):
            tx = reg[name].chain()
            s_s = jax.eval_shape(tx.init, p_s)
            c = train_step(tx).lower(p_s, s_s, p_s).compile()
            for tag, g in (("", grads), ("/zeros", zeros)):
                ms.append(Measured(name + tag, c,
                                   lambda tx=tx, p=params: (_copy(p), tx.init(p)), (g,)))
        times = time_group(ms, args.reps, 3, steps)
        med = {n: statistics.median(t) for n, t in times.items()}
        for name in args.only.split(","):
            print(f"{tname} {name:20s} {med[name] * 1e3:8.3f} ms, with zero leaves "
                  f"{med[name + '/zeros'] * 1e3:8.3f} ms: {med[name + '/zeros'] / med[name]:.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
