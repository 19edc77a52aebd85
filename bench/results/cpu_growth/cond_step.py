"""What a ``lax.cond`` around an Adam-like step costs to compile on many small leaves, on
XLA:CPU, without optclip: what a bare cond adds, for comparison with the guards' step.

On the bench's mixed many-leaves tree, one jitted train step (params, first and second
moments donated; gradients not), in one of three forms:

- ``plain``: the step as it is (moments, update, params + update);
- ``cond``: the moments and the update under a ``lax.cond`` on the finiteness of the first
  leaf's sum, the other branch giving zero updates and the moments as they were (what
  ``skip_nonfinite`` does, without its norm, stats or state);
- ``while``: the same by a ``lax.while_loop`` of zero or one trip, the updates zeroed after
  it by a select.

Prints each form's seconds to trace, lower and compile (one sample, each form in a fresh
process) and the compiled program's copy instructions.

Run: PYTHONPATH=. python bench/results/cpu_growth/cond_step.py [--leaves 2000]
"""
import argparse
import subprocess
import sys
import time


def one(form: str, n: int) -> str:
    import jax
    import jax.numpy as jnp
    from jax import lax

    from bench.trees import TREES, abstract_tree

    tree = jax.tree.leaves(abstract_tree(TREES[f"many{n}"]()))

    def step(m, v, g):
        m2 = [0.9 * a + 0.1 * b for a, b in zip(m, g, strict=True)]
        v2 = [0.99 * a + 0.01 * b * b for a, b in zip(v, g, strict=True)]
        u = [-1e-3 * a / (jnp.sqrt(b) + 1e-8) for a, b in zip(m2, v2, strict=True)]
        return u, m2, v2

    def f(p, m, v, g):
        ok = jnp.isfinite(jnp.sum(g[0]))
        if form == "plain":
            u, m2, v2 = step(m, v, g)
        elif form == "cond":
            u, m2, v2 = lax.cond(ok, lambda ops: step(*ops),
                                 lambda ops: ([jnp.zeros_like(x) for x in ops[2]], ops[0], ops[1]),
                                 (m, v, g))
        else:
            def body(c):
                _, u, m, v = c
                return (jnp.ones((), bool), *step(m, v, u))
            _, u, m2, v2 = lax.while_loop(lambda c: ~c[0], body, (~ok, g, m, v))
            u = [jnp.where(ok, x, jnp.zeros_like(x)) for x in u]
        return [a + b for a, b in zip(p, u, strict=True)], m2, v2

    t0 = time.perf_counter()
    compiled = jax.jit(f, donate_argnums=(0, 1, 2)).lower(tree, tree, tree, tree).compile()
    dt = time.perf_counter() - t0
    return f"{form:6s} {n} leaves: {dt:6.2f} s, {compiled.as_text().count(' copy(')} copies"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--leaves", type=int, default=2000)
    ap.add_argument("--one")
    args = ap.parse_args()
    if args.one:
        print(one(args.one, args.leaves))
        return
    for form in ("plain", "cond", "while"):
        out = subprocess.run([sys.executable, __file__, "--one", form, "--leaves",
                              str(args.leaves)], capture_output=True, text=True, check=True)
        print(out.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
