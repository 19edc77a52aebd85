"""What one kernel per leaf costs XLA:CPU to compile, by the form of its element-wise work.

    python bench/results/cpu_value_clamp/kernel_forms.py FORMS REPS

1,000 small float32 leaves (``bench.trees``' many1000), each through one element-wise
expression with two scalar bounds ``l`` and ``h``, in one jitted function; each sample in a
fresh process, the forms in shuffled order each round; medians. FORMS (comma list):
``scale`` (``x * l``, the global norm's form), ``clamp`` (``min(max(x, l), h)``), ``isfinite``
(that, with NaN and inf passed through by a select: ``clip_by_value``'s form before),
``lax_clamp`` (``lax.clamp(l, x, h)``), ``isfinite_clamp`` (that with the select: its form
now), ``absinf`` and ``subeq_clamp`` (other tests for inf), ``maxmin_inf``, ``mul_isfinite``
(``x * l`` with the select: ``clippy``'s form, less its gather), ``mul_subeq``,
``mul_scalar_pred``.
"""
import random
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[3])
CODE = r'''
import sys, time; sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp
from jax import lax
from bench.trees import TREES, abstract_tree
tree = jax.tree.leaves(abstract_tree(TREES["many1000"]()))
V = "{v}"
def leaf(x, lo, hi):
    l = lax.broadcast_in_dim(lo, x.shape, ()); h = lax.broadcast_in_dim(hi, x.shape, ())
    if V == "scale": return x * l
    c = lax.min(lax.max(x, l), h)
    if V == "clamp": return c
    if V == "isfinite": return lax.select(lax.is_finite(x), c, x)
    if V == "absinf": return lax.select(lax.eq(lax.abs(x), lax.full_like(x, jnp.inf)), x, c)
    if V == "lax_clamp": return lax.clamp(l, x, h)
    if V == "isfinite_clamp": return lax.select(lax.is_finite(x), lax.clamp(l, x, h), x)
    if V == "subeq_clamp":
        return lax.select(lax.eq(lax.sub(x, x), lax.full_like(x, 0)), lax.clamp(l, x, h), x)
    if V == "mul_isfinite": return lax.select(lax.is_finite(x), x * l, x)
    if V == "mul_subeq": return lax.select(lax.eq(lax.sub(x, x), lax.full_like(x, 0)), x * l, x)
    if V == "mul_scalar_pred":
        z = lax.broadcast_in_dim(lax.eq(lo, 0.0), x.shape, ())
        return lax.select(z, lax.full_like(x, 0), x * l)
    if V == "maxmin_inf":
        # +inf passes (its upper bound widened to inf), -inf does not: not a candidate
        return lax.min(lax.max(x, l), lax.max(h, x))
def f(xs, lo, hi):
    return [leaf(x, lo, hi) for x in xs]
s = jax.ShapeDtypeStruct((), jnp.float32)
w = jax.jit(f).lower(tree[:3], s, s).compile()
t0 = time.perf_counter()
lo = jax.jit(f, donate_argnums=0).lower(tree, s, s)
t1 = time.perf_counter(); lo.compile(); t2 = time.perf_counter()
print("R", t1 - t0, t2 - t0)
'''


def main() -> None:
    forms, reps = sys.argv[1].split(","), int(sys.argv[2])
    got: dict[str, list] = {v: [] for v in forms}
    for _ in range(reps):
        order = forms[:]
        random.shuffle(order)
        for v in order:
            code = CODE.replace("{v}", v).replace("{root!r}", repr(ROOT))
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 cwd="/tmp", check=False)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("R ")]
            if not line:
                raise SystemExit(out.stderr[-1500:])
            got[v].append([float(x) for x in line[0].split()[1:]])
    for v in forms:
        total = statistics.median(t for _, t in got[v])
        lower = statistics.median(lo for lo, _ in got[v])
        print(f"{v:15s} total {total:.3f} lower {lower:.3f}")


if __name__ == "__main__":
    main()
