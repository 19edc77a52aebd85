"""clippy's step against another checkout's, side by side in one process (a shared machine
varies by 10-40% between runs; interleaved rounds in one process do not).

    python -m bench.clippy_side TREE OLD_CLIPPY_PY [REPS]

``OLD_CLIPPY_PY`` is ``optclip/clippy.py`` of another checkout (a ``git worktree``), loaded
as a module of its own beside this checkout's ``optclip`` (its imports, ``optclip.norms``
and the rest, are this checkout's: use it where only ``clippy.py`` differs). Prints the
median step of adam + clippy(0.1, 1e-7) with this checkout's clippy and with the other's,
over the global-norm chain's, and each compiled step's temporaries as a share of the tree.
The three steps run in each of their six orders in turn (use a multiple of 6 reps).
"""

from __future__ import annotations

import importlib.util
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optclip
from bench import trees
from bench.run import temp_bytes, train_step


def main(tree: str, old_path: str, reps: int = 12) -> None:
    spec = importlib.util.spec_from_file_location("clippy_old", old_path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    p = trees.make_tree(trees.TREES[tree]())
    g = trees.make_tree(trees.TREES[tree](), seed=1)
    txs = {"gn": optax.chain(optclip.clip_by_global_norm(1.0), optax.adam(1e-3)),
           "clippy_this": optax.chain(optax.adam(1e-3), optclip.clippy(0.1, 1e-7)),
           "clippy_other": optax.chain(optax.adam(1e-3), old.clippy(0.1, 1e-7))}
    cs = {k: train_step(tx).lower(p, tx.init(p), g).compile() for k, tx in txs.items()}
    carry = {k: (jax.tree.map(jnp.copy, p), tx.init(p)) for k, tx in txs.items()}
    ts: dict[str, list[float]] = {k: [] for k in txs}
    keys = list(txs)
    for r in range(reps):
        # each round in another order (a step's time depends on the step before it: a fixed
        # order gave two identical programs 1.10x apart, bench/results/cpu_clippy_grad/); the
        # rotations and their reversals: all six orders in six rounds
        order = keys[r % 3:] + keys[:r % 3]
        for k in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            carry[k] = jax.block_until_ready(cs[k](*carry[k], g))
            ts[k].append(time.perf_counter() - t0)
    gn = float(np.median(ts["gn"]))
    for k in txs:
        t = float(np.median(ts[k]))
        print(f"{tree} {k:12s} step {1e3 * t:7.1f} ms, / global-norm chain {t / gn:.2f}x, "
              f"temp {temp_bytes(cs[k]) / trees.tree_bytes(p):.3f}x the tree", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 12)
