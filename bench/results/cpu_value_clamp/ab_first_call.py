"""Paired first calls of two optclip checkouts in one process, alternated (A B, B A, ...).

    PYTHONPATH=. python bench/results/cpu_value_clamp/ab_first_call.py A B TREE NAMES REPS [alone]

A and B are checkouts of optclip (``git worktree add``); TREE one of ``bench.trees.TREES``;
NAMES a comma list of ``bench.clippers`` entries; with ``alone``, each transformation's update
alone is compiled (as the many-leaves trees of ``python -m bench``), else its chain + adam's
train step. Each first call is trace + lower + compile after ``jax.clear_caches()``. Both
checkouts are imported into this process (their modules swapped in ``sys.modules``), so
that the machine's drift between fresh processes does not fall between A and B: the paired
difference B - A is what to read.
"""

import importlib
import statistics
import sys
import time
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[3])
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from bench.run import train_step  # noqa: E402
from bench.trees import TREES, abstract_tree  # noqa: E402


def load(path: str) -> dict:
    """``bench.clippers.entries()`` over the optclip at ``path``."""
    for m in [m for m in sys.modules
              if m == "optclip" or m.startswith(("optclip.", "bench.clippers"))]:
        del sys.modules[m]
    sys.path.insert(0, path)
    # (not ``from bench import clippers``: that would take the package's attribute, the
    # module as first imported)
    clippers = importlib.import_module("bench.clippers")
    assert clippers.optclip.__file__.startswith(path), clippers.optclip.__file__
    sys.path.remove(path)
    return clippers.entries()


def first_call(reg: dict, name: str, tree, alone: bool) -> tuple[float, float]:
    """(trace + lower, trace + lower + compile) in seconds."""
    tx = reg[name].alone() if alone else reg[name].chain()
    state = jax.eval_shape(tx.init, tree)
    jax.clear_caches()
    t0 = time.perf_counter()
    if alone:
        fn = jax.jit(lambda u, s, p: tx.update(u, s, p), donate_argnums=(0, 1))
        lowered = fn.lower(tree, state, tree)
    else:
        lowered = train_step(tx).lower(tree, state, tree)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t0


def main() -> None:
    a, b, tree_name, names, reps = sys.argv[1:6]
    alone = sys.argv[6:] == ["alone"]
    regs = {"A": load(str(Path(a).resolve())), "B": load(str(Path(b).resolve()))}
    tiny = abstract_tree(TREES["tiny"]())
    warm = regs["A"]["adam"].chain()
    train_step(warm).lower(tiny, jax.eval_shape(warm.init, tiny), tiny).compile()
    tree = abstract_tree(TREES[tree_name]())
    for name in names.split(","):
        got: dict[str, list] = {"A": [], "B": []}
        for r in range(int(reps)):
            for k in ("A", "B") if r % 2 == 0 else ("B", "A"):
                got[k].append(first_call(regs[k], name, tree, alone))
        med = {k: (statistics.median(x[1] for x in v), statistics.median(x[0] for x in v))
               for k, v in got.items()}
        diffs = [y[1] - x[1] for x, y in zip(got["A"], got["B"], strict=True)]
        print(f"{tree_name} {name}: A {med['A'][0]:.3f} s (lower {med['A'][1]:.3f}), "
              f"B {med['B'][0]:.3f} s (lower {med['B'][1]:.3f}); B-A paired median "
              f"{statistics.median(diffs):+.3f} s, range {min(diffs):+.3f}..{max(diffs):+.3f}",
              flush=True)


if __name__ == "__main__":
    main()
