"""Every output and stat of seven clippers, saved for a bit-for-bit comparison of two checkouts.

Run in each checkout, then compare (how b532115 was checked against 3bdf577):

    PYTHONPATH=. python bench/results/cpu_trace/compare_outputs.py /tmp/new.npz
    (cd <worktree of 3bdf577> && PYTHONPATH=. python <this file> /tmp/old.npz)
    python -c "import numpy as np; a, b = np.load('/tmp/old.npz'), np.load('/tmp/new.npz'); \
        print([k for k in a.files if not np.array_equal(a[k], b[k], equal_nan=True)])"

The tree: 132 leaves (11 shapes, zero-size and scalar-like ones among them, twelve times),
in float32 and bfloat16, with and without a NaN and an inf, three steps each.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

import optclip

SHAPES = [(3,), (40, 70), (5,), (2, 3, 4), (300, 20), (7,), (1,), (64, 64), (9, 11), (0,),
          (513,)] * 12
CLIPPERS = {
    "leaf_norm": lambda: optclip.clip_by_leaf_norm(1.0),
    "block_rms": lambda: optclip.clip_by_block_rms(0.1),
    "agc": lambda: optclip.agc(0.05),
    "adagc": lambda: optclip.adagc(warmup_steps=1, lambda_abs=1.0),
    "clippy": lambda: optclip.clippy(0.1, 1e-3),
    "gn": lambda: optclip.clip_by_global_norm(1.0),
    "value": lambda: optclip.clip_by_value(0.5),
}


def tree(rng, dtype, bad):
    t = {f"l{i}": jnp.asarray(rng.normal(size=s) * 10 ** rng.uniform(-3, 2), dtype)
         for i, s in enumerate(SHAPES)}
    if bad:
        t["l5"] = t["l5"].at[0].set(jnp.nan)
        t["l4"] = t["l4"].at[1, 1].set(jnp.inf)
    return t


def main(path):
    rng = np.random.default_rng(0)
    out = {}
    for dt in [jnp.float32, jnp.bfloat16]:
        for bad in [False, True]:
            g1, g2, p = tree(rng, dt, bad), tree(rng, dt, False), tree(rng, dt, False)
            for k, make in CLIPPERS.items():
                tx = make()
                st = tx.init(p)
                f = jax.jit(tx.update)
                for step, g in enumerate([g1, g2, g1]):
                    u, st = f(g, st, p)
                    key = f"{dt.__name__}-{bad}-{k}-{step}"
                    for n, v in u.items():
                        out[f"{key}-{n}"] = np.asarray(v.astype(jnp.float32))
                    for n, v in optclip.stats(st).items():
                        out[f"{key}-stat-{n}"] = np.asarray(v, np.float64)
    np.savez(path, **out)
    print("saved", len(out))


if __name__ == "__main__":
    main(sys.argv[1])
