"""Which forms of an update-space clip let XLA:CPU read Adam's update ``u = -lr * d`` where
it is made, rather than write it out: bytes each jitted function moves (``bench.traffic``),
in units of one float32 1024x1024 array, and its temp buffer in the same units.

``d`` stands for Adam's direction (an input here, as it is written out inside the step), ``p``
for the weights; each function returns ``p + u * factor``, and the factor comes from the
reductions named. The floor is 4 for a clip that takes one reduction of ``u`` (read ``d``
once for it, then ``d`` and ``p`` and write the result), one more for each further
reduction of arrays already in memory.

    python bench/results/cpu_traffic/clippy_fusion.py
"""

import jax
import jax.numpy as jnp

from bench import traffic

D = jax.ShapeDtypeStruct((1024, 1024), jnp.float32)
UNIT = 4 * 1024 * 1024


def clip(stat_sum: bool, ratio: str):
    def f(d, p):
        u = d * -0.001
        if ratio == "select":  # clippy's and bench.clippers.fused_clippy's: inf where u is 0
            m = jnp.min(jnp.where(u != 0, jnp.abs(p) / jnp.abs(u), jnp.inf))
        elif ratio == "arithmetic":  # x / 0 is inf already, but 0 / 0 is NaN
            m = jnp.min(jnp.abs(p) / jnp.abs(u))
        else:
            m = jnp.ones((), jnp.float32)
        s = jnp.sum(u * u) if stat_sum else jnp.ones((), jnp.float32)
        return p + u * jnp.minimum(1, m / s)
    return f


for stat_sum, ratio in [(True, "none"), (False, "select"), (True, "select"),
                        (False, "arithmetic"), (True, "arithmetic")]:
    c = jax.jit(clip(stat_sum, ratio)).lower(D, D).compile()
    moved = traffic.step_cost(c).ordinary() / UNIT
    temp = c.memory_analysis().temp_size_in_bytes / UNIT
    print(f"sum of squares {stat_sum!s:5s}, ratio min {ratio:10s}: moves {moved:5.2f}, "
          f"temp {temp:.2f}")
