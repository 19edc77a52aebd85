"""What each eager call of a clipper's update, or of a norm function, costs: XLA compiles
and time.

    python -m bench.eager_probe [--calls 5]

An eager ``tx.update`` (not under ``jit``) ran op by op, and JAX traced its ``lax.cond``
branches again at every call, as new programs, and compiled each again: the compiles after
the first call are what every later eager step paid. Since ``_common.transformation``, the
second call of an update with JAX arrays builds one compiled program, which later calls
reuse (the first still runs op by op); ``optclip.global_norm``, ``leaf_norms`` and
``unitwise_norm`` run compiled from their first call. Times are wall-clock, results waited
for, on a two-leaf tree plus a 64x64 matrix.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time


def lowerings(fn):
    """``(fn(), names)``: ``names`` are the programs JAX lowers while ``fn`` runs (builds for
    XLA: compiled, or found in a cache), by the log line that names each."""
    import jax

    seen = []

    class Log(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith("Compiling "):
                seen.append(msg.split(" with ", 1)[0])

    log = logging.getLogger("jax._src.interpreters.pxla")
    handler, level = Log(), log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING)  # the level JAX logs these at (bench.compile_log raises it)
    try:
        with jax.log_compiles(True):
            out = fn()
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return out, seen


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=5, help="at least 3")
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import optax

    import optclip

    for name in ("jax._src.interpreters.pxla", "jax._src.dispatch"):
        logging.getLogger(name).propagate = False
    g = {"a": jnp.ones((3, 4)), "b": jnp.ones(5), "c": jnp.ones((64, 64))}
    build = {"clip_by_global_norm": lambda: optclip.clip_by_global_norm(1.0),
             "clip_by_value": lambda: optclip.clip_by_value(0.1),
             "clip_by_leaf_norm": lambda: optclip.clip_by_leaf_norm(1.0),
             "clip_by_block_rms": lambda: optclip.clip_by_block_rms(1e-3),
             "agc": lambda: optclip.agc(0.01), "autoclip": lambda: optclip.autoclip(),
             "zclip": lambda: optclip.zclip(), "adagc": lambda: optclip.adagc(),
             "clippy": lambda: optclip.clippy(),
             "skip_nonfinite": lambda: optclip.skip_nonfinite(optax.adam(1e-3))}
    norms = {"optclip.global_norm": lambda: optclip.global_norm(g),
             "optclip.leaf_norms": lambda: optclip.leaf_norms(g),
             "optclip.unitwise_norm": lambda: optclip.unitwise_norm(g["c"])}
    for name, make in list(build.items()) + list(norms.items()):
        if name in norms:
            step = make
        else:
            tx = make()
            box = {"state": tx.init(g)}

            def step(tx=tx, box=box):
                out, box["state"] = tx.update(g, box["state"], g)
                return out, box["state"]
        compiles, secs = [], []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            _, names = lowerings(lambda step=step: jax.block_until_ready(step()))
            secs.append(time.perf_counter() - t0)
            compiles.append(len(names))
        print(f"{name:20s} first call {secs[0]:.2f} s ({compiles[0]} programs compiled); "
              f"second {secs[1]:.2f} s ({compiles[1]}); "
              f"later calls {1e3 * statistics.median(secs[2:]):.1f} ms "
              f"({', '.join(map(str, compiles[2:]))} compiled)", flush=True)


if __name__ == "__main__":
    main()
