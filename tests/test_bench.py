"""The benchmark harness runs (--quick), and the fast path fuses: checked on the compiled HLO."""

import jax
import jax.numpy as jnp
import optax

import optclip
from bench import run as bench_run


def test_bench_quick_runs_and_reports(tmp_path):
    results = bench_run.main(["--quick", "--reps", "1", "--out", str(tmp_path)])
    assert (tmp_path / "results.md").read_text().count("|") > 20
    assert (tmp_path / "results.json").stat().st_size > 0
    tiny = results[0]
    for key in ("floor_read", "floor_read_write", "alone/clip_by_global_norm",
                "alone/optax_global_norm", "chain/donated/adam",
                "chain/donated/clip_by_global_norm+adam", "chain/not_donated/adam"):
        assert tiny["step_s"][key] > 0 and tiny["compile_s"][key] > 0
    ratios = bench_run.ratios(tiny)
    assert "chain/donated/clip_by_global_norm+adam / adam" in ratios


def _train_step_temp_bytes(tx, tree):
    def f(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    compiled = jax.jit(f, donate_argnums=(0, 1)).lower(tree, tx.init(tree), tree).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_clip_fuses_into_adam_without_a_full_size_buffer():
    # Leaves above norms.SMALL_LEAF, so that they are reduced one by one as in a real model.
    tree = {"a": jnp.ones((512, 256)), "b": jnp.ones((384, 256))}
    tree_bytes = sum(x.nbytes for x in jax.tree.leaves(tree))
    ours = _train_step_temp_bytes(
        optax.chain(optclip.clip_by_global_norm(1.0), optax.adam(1e-3)), tree)
    theirs = _train_step_temp_bytes(
        optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)), tree)
    adam = _train_step_temp_bytes(optax.adam(1e-3), tree)
    # Optax writes the clipped gradients out (a temporary the size of the tree); optclip's
    # scale is one multiply inside adam's element-wise pass.
    assert theirs >= tree_bytes // 2
    assert ours <= adam + tree_bytes // 20
