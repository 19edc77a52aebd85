"""Paired step times of two optclip checkouts' chains + adam in one process, interleaved.

    PYTHONPATH=. python bench/results/cpu_value_clamp/ab_step.py A B TREE NAME REPS [GRAD_SCALE]

Each chain's train step (donated) is compiled and run twice, then REPS steps of each are
timed alternately (A B, B A, ...) on the same gradients (``bench.trees.make_tree``, scale
GRAD_SCALE, default 0.01 as in ``python -m bench``: ``clip_by_value`` (0.1) clamps none of its
elements, ``clip_by_value_clamping`` (0.01) about a third).
"""

import statistics
import sys
import time
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[3])
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.run import train_step  # noqa: E402
from bench.trees import TREES, make_tree  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_first_call import load  # noqa: E402


def main() -> None:
    a, b, tree_name, name, reps = sys.argv[1:6]
    scale = float(sys.argv[6]) if len(sys.argv) > 6 else 0.01
    regs = {"A": load(str(Path(a).resolve())), "B": load(str(Path(b).resolve()))}
    shapes = TREES[tree_name]()
    params = make_tree(shapes, seed=0, scale=0.1)
    grads = make_tree(shapes, seed=1, scale=scale)
    fns, carry = {}, {}
    for k, reg in regs.items():
        tx = reg[name].chain()
        fns[k] = train_step(tx)
        p = jax.tree.map(jnp.copy, params)
        carry[k] = (p, tx.init(p))
        for _ in range(2):
            carry[k] = jax.block_until_ready(fns[k](*carry[k], grads))
    got: dict[str, list[float]] = {"A": [], "B": []}
    for r in range(int(reps)):
        for k in ("A", "B") if r % 2 == 0 else ("B", "A"):
            t0 = time.perf_counter()
            carry[k] = jax.block_until_ready(fns[k](*carry[k], grads))
            got[k].append(time.perf_counter() - t0)
    ma, mb = statistics.median(got["A"]), statistics.median(got["B"])
    print(f"{tree_name} {name}: A {ma * 1e3:.1f} ms, B {mb * 1e3:.1f} ms, B/A {mb / ma:.3f}")


if __name__ == "__main__":
    main()
