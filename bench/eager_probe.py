"""How many XLA compiles each eager call of a clipper's update costs.

    python -m bench.eager_probe [--calls 3]

An eager ``tx.update`` (not under ``jit``) traces its ``lax.cond`` branches again at every
call, as new jaxprs, and JAX compiles each cond again: the count after the first call is
what every later eager step pays.
"""

from __future__ import annotations

import argparse
import logging


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=3)
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    import optclip

    count = {"n": 0}

    class Count(logging.Handler):
        def emit(self, rec):
            count["n"] += "Finished XLA compilation" in rec.getMessage()

    jax.config.update("jax_log_compiles", True)
    log = logging.getLogger("jax._src.dispatch")
    log.addHandler(Count())
    log.propagate = False
    logging.getLogger("jax._src.interpreters.pxla").setLevel(logging.ERROR)
    g = {"a": jnp.ones((3, 4)), "b": jnp.ones(5)}
    for name, tx in (("clip_by_global_norm", optclip.clip_by_global_norm(1.0)),
                     ("clip_by_leaf_norm", optclip.clip_by_leaf_norm(1.0))):
        state = tx.init(g)
        for i in range(args.calls):
            before = count["n"]
            _, state = tx.update(g, state)
            print(f"{name}: eager call {i}: {count['n'] - before} XLA compiles", flush=True)


if __name__ == "__main__":
    main()
