"""Gradient field of a loss surface with a cliff, raw and clipped, after Pascanu et al. 2013.

The loss is a bowl with a sharp drop (a "cliff") across the line w1 + w2 = 0:

    f(w) = 0.5 * |w - (0.6, -0.6)|**2 + H * (1 - sigmoid(k * (w1 + w2)))

On the wall the gradient reaches H * k / 4 * sqrt(2) (here ~35) against ~1
elsewhere, and it points across the wall, not towards the minimum. Plain SGD
that lands on the wall takes one huge step and is thrown far from where it
was heading (whether it lands on the steep part depends on the start: from
this one it does); with ``clip_by_global_norm(1.0)`` every step is at most
lr * 1 long, and the descent crosses the wall in small steps. Clipping keeps
each arrow's direction and bounds its length.

Run:  python examples/gradient_field.py [--out DIR]
"""

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optclip
import optclip.plotting
from optclip.plotting import plot_gradient_field

H, K = 1.0, 100.0
MINIMUM = jnp.array([0.6, -0.6])


def loss(w):
    return 0.5 * jnp.sum((w - MINIMUM) ** 2) + H * (1.0 - jax.nn.sigmoid(K * (w[0] + w[1])))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out")
    p.add_argument("--max-norm", type=float, default=1.0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the true minimum sits just past the wall, off the bowl's centre: find it
    minimum = optclip.plotting.descend(loss, (0.65, -0.55), optax.adam(1e-3), 3000)[-1]
    fig, raw, clipped = plot_gradient_field(
        loss, optclip.clip_by_global_norm(args.max_norm), out / "gradient_field.png",
        start=(-0.9, -0.5), lr=0.1, steps=40, xlim=(-1.0, 2.5), ylim=(-1.0, 1.5), grid=25,
        minimum=minimum, cliff=((0.05, 0.15), "cliff: |g| up to 35"),
        title=f"A cliff in the loss: SGD lr=0.1, without and with clip_by_global_norm"
              f"({args.max_norm})")
    longest = lambda path: float(np.max(np.linalg.norm(np.diff(path, axis=0), axis=1)))  # noqa: E731
    print(f"longest SGD step without clipping: {longest(raw):.3f}; with clipping: "
          f"{longest(clipped):.3f} (bound: lr * max_norm = {0.1 * args.max_norm:.3f})")
    m = np.asarray(MINIMUM)
    print(f"distance to the bowl's centre after 40 steps: without {np.linalg.norm(raw[-1] - m):.3f}"
          f", with {np.linalg.norm(clipped[-1] - m):.3f}")
    print(f"minimum at ({minimum[0]:.3f}, {minimum[1]:.3f}), loss {float(loss(minimum)):.4f}")
    print(f"wrote {out / 'gradient_field.png'}")
    return raw, clipped


if __name__ == "__main__":
    main()
