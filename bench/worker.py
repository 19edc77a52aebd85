"""A subprocess that compiles clippers' ``update`` (or their chains' train steps), one task
at a time: the many-leaves compiles, and the step trees' repeated first calls.

The parent (``bench.run``) writes a JSON list of tasks ``[[tree, clipper], ...]`` on its
stdin (``[tree, clipper, "chain"]``: the chain + adam's train step, not the update
alone) and reads one JSON line per event on its stdout: ``{"ready": true}`` once imports and
a warm-up compile are done, ``{"start": i}`` when task i begins, then its result. The
parent kills the worker when a task runs past ``--max-compile-s`` and starts a new one
for the remaining tasks, so a clipper that takes minutes to compile cannot hang the run.
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def _emit(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def compile_update(tx, tree, hlo: bool = False):
    """Trace, lower and compile ``tx.update`` alone, jitted with updates and state donated.

    Returns (seconds to trace and lower, seconds to compile, temp bytes or None), and with
    ``hlo`` the compiled program's text after them.
    """
    import jax

    from bench.run import lower_and_compile, temp_bytes

    def f(u, s, p):
        return tx.update(u, s, p)

    state = jax.eval_shape(tx.init, tree)
    compiled, lower_s, compile_s = lower_and_compile(jax.jit(f, donate_argnums=(0, 1)),
                                                     tree, state, tree)
    if hlo:
        return lower_s, compile_s, temp_bytes(compiled), compiled.as_text()
    return lower_s, compile_s, temp_bytes(compiled)


def compile_chain(tx, tree):
    """Trace, lower and compile ``chain + adam``'s train step as ``bench.run`` compiles it
    (params and state donated). Returns (seconds to trace and lower, seconds to compile,
    temp bytes or None)."""
    import jax

    from bench.run import lower_and_compile, temp_bytes, train_step

    state = jax.eval_shape(tx.init, tree)
    compiled, lower_s, compile_s = lower_and_compile(train_step(tx), tree, state, tree)
    return lower_s, compile_s, temp_bytes(compiled)


def main() -> None:
    import jax

    if os.environ.get("OPTCLIP_BENCH_BACKEND"):
        jax.config.update("jax_platforms", os.environ["OPTCLIP_BENCH_BACKEND"])
    from bench.clippers import entries
    from bench.trees import TREES, abstract_tree, tree_bytes

    tasks = json.loads(sys.stdin.read())
    reg = entries()
    # warm-up: the first compile in a process pays one-off costs
    compile_update(reg["clip_by_global_norm"].alone(), abstract_tree(TREES["tiny"]()))
    _emit({"ready": True})
    trees: dict = {}
    for i, (tree_name, name, *kind) in enumerate(tasks):
        _emit({"start": i})
        if tree_name not in trees:
            trees[tree_name] = abstract_tree(TREES[tree_name]())
        tree = trees[tree_name]
        # each task a first call: no trace of an earlier task's (jnp's own jitted helpers
        # included) is reused. XLA's one-off costs in a process are paid by the warm-up and
        # the earlier tasks: a fresh process took 0.2 s longer on 1,000 leaves, by run
        # (bench/results/cpu_bench_medians/)
        jax.clear_caches()
        try:
            if kind == ["chain"]:  # the chain + adam's train step
                lower_s, compile_s, temp = compile_chain(reg[name].chain(), tree)
            else:
                lower_s, compile_s, temp = compile_update(reg[name].alone(), tree)
            _emit({"i": i, "tree": tree_name, "clipper": name, "lower_s": lower_s,
                   "compile_s": compile_s, "first_call_s": lower_s + compile_s,
                   "temp_bytes": temp, "tree_bytes": tree_bytes(tree)})
        except Exception as exc:  # recorded, and the run goes on
            _emit({"i": i, "tree": tree_name, "clipper": name,
                   "error": f"{type(exc).__name__}: {exc}"[:500],
                   "traceback": traceback.format_exc()[-2000:]})


if __name__ == "__main__":
    main()
