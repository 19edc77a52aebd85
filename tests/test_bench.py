"""The benchmark harness runs (--quick) and reports; every clipper's compiled step has no
full-size temporary; fresh states are donatable. Checked on the compiled HLO of small trees."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import refs

import optclip
from bench import gn_probe
from bench import run as bench_run
from bench.clippers import OPTCLIP, STEP_ONLY, entries
from bench.compile_probe import fused_counts
from bench.trees import TREES, abstract_tree, make_tree, mixed_leaves_shapes, tree_bytes
from optclip import norms as _n

REG = entries()
CLIPPERS = [n for n in OPTCLIP if n in REG and n not in STEP_ONLY]  # clippy once it exists

# Measured on the 4.6 MB "small" tree (jax 0.10.2, XLA:CPU), re-measured at the commit that
# added norms.own_copies. Strict: once the clipper is fixed the test passes, the xfail fails,
# and the mark should be removed.
_GROUPED = ("temp {} of the tree: the leaves under 65,536 elements (8% of this tree's bytes) "
            "are concatenated into one buffer for the norm (per-leaf norms: padded into "
            "buckets)")
_GUARD = ("temp 100% of the tree on XLA:CPU, as optax.apply_if_finite's: the updates leave the "
          "step's lax.cond before they are applied, so XLA:CPU writes them out (110% before, "
          "when the select copied the donated moments; apply_if_finite 0.01% on an H200)")
TEMP_XFAIL = {
    "clip_by_value": _GROUPED.format("8.5%"),
    "clip_by_global_norm": _GROUPED.format("8.1%"),
    "clip_by_block_rms": _GROUPED.format("11.7%"),
    "clip_by_leaf_norm": _GROUPED.format("11.7%"),
    "autoclip": _GROUPED.format("8.1%"),
    "autoclip_h1000": _GROUPED.format("8.1%"),
    "zclip": _GROUPED.format("8.1%"),
    "adagc": _GROUPED.format("11.7%"),
    "skip_nonfinite": _GUARD,
    "skip_on_spike": _GUARD,
    "clippy": "temp 107% of the tree (104% ResNet-50, 101% GPT-2: python -m bench.traffic "
              "--only clippy; 312% before its ratios' min and its norm came from one pass): "
              "XLA:CPU reduces arrays in memory, so the update after adam is written out "
              "once; update-space clipping holds at least 1x the tree there "
              "(optax.clip_by_block_rms after adam: 1.00x; python -m bench.xla_probe "
              "update_space), and a hand-fused Clippy that takes the same stat in the same "
              "pass holds 1x (bench/results/cpu_traffic/)",
}
DONATE_XFAIL: dict[str, str] = {}  # zclip and skip_on_spike shared a buffer; fixed
ON_CPU = jax.default_backend() == "cpu"
# XLA:GPU (an H200, jax 0.11.2): bench/results/h200_2f30d35/gpu_tests_2.log
AGC_GPU_TEMP = pytest.mark.xfail(
    not ON_CPU, strict=True,
    reason="agc on XLA:GPU holds a temporary of 15-47% of these trees (2.3% of GPT-2, 8.7% of "
           "ResNet-50 in python -m bench); the XLA:CPU step holds none")


def _marked(names, xfails, gpu_xfails=None):
    gpu_xfails = gpu_xfails or {}
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=xfails[n]))
            if n in xfails else pytest.param(n, marks=gpu_xfails[n]) if n in gpu_xfails
            else n for n in names]


def test_bench_quick_runs_and_reports(tmp_path):
    # as a user runs it; at XLA's lowest backend optimisation (as the demos' smoke tests, see
    # test_examples.FAST_COMPILE): this checks the report, not the figures in it
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    # the run records the glibc tunables it had beside its command, whatever they do to its
    # figures (this one alone maps more blocks afresh: bench/results/cpu_malloc/README.md)
    env["GLIBC_TUNABLES"] = "glibc.malloc.trim_threshold=1099511627776"
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    md = (tmp_path / "results.md").read_text()
    assert result["meta"]["glibc_tunables"] == env["GLIBC_TUNABLES"]
    assert ("Command: `GLIBC_TUNABLES=glibc.malloc.trim_threshold=1099511627776 python -m "
            f"bench --quick --out {shlex.quote(str(tmp_path))}`") in md
    assert "### Targets" in md and "| met |" in md and "### Many leaves" in md
    assert result["targets"]
    assert "first call" in (tmp_path / "bench.log").read_text()
    (small,) = result["step"]
    for key in ("floor_read", "floor_read_write", "alone/clip_by_global_norm", "adam",
                "fused_global_norm", "optax.clip", "optax.clip_by_global_norm",
                "optax.clip_by_block_rms", "optax.adaptive_grad_clip", *CLIPPERS):
        e = small["entries"][key]
        assert e["step_s"] > 0 and e["first_call_s"] > 0 and e["temp_bytes"] is not None
    ratios = {(r["num"], r["den"]) for r in small["ratios"]}
    assert ("clip_by_value", "optax.clip") in ratios
    assert ("agc", "adam") in ratios
    assert ("clip_by_global_norm", "fused_global_norm") in ratios
    assert ("zclip", "clip_by_global_norm") in ratios
    assert all(r["paired"] > 0 for r in small["ratios"] if "+" not in r["den"])
    assert re.search(r"\| step: agc / adam \| [0-9.]+x \(paired [0-9.]+x\) \|", md)
    many = result["many"]["results"]["tiny_many"]
    for name in CLIPPERS:
        assert many[name]["first_call_s"] > 0, many[name]
    whats = {r["what"] for r in result["targets"]}
    assert "first call: agc / optax.adaptive_grad_clip (chains)" in whats
    assert all(r["met"] in (True, False, None) for r in result["targets"])


def test_the_command_line_names_the_glibc_tunables_the_run_had():
    # on XLA:CPU they decide whether temporaries are page-faulted at every step
    # (bench/results/cpu_malloc/): a run's figures must say which it had
    from bench.run import command_line

    tuned = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0"
    assert command_line({"argv": ["--many-trees", "", "--reps", "7"]}) == (
        "python -m bench --many-trees '' --reps 7")
    assert command_line({"argv": ["--quick"], "glibc_tunables": tuned}) == (
        f"GLIBC_TUNABLES={tuned} python -m bench --quick")
    assert command_line({"argv": [], "glibc_tunables": None}) == "python -m bench"


def test_paired_ratio_is_the_median_of_each_rounds_ratio():
    # A stretch of slow rounds moves every member of a group: the ratio of medians then
    # mixes fast rounds of one chain with slow rounds of the other, the paired ratio does not.
    den = [1.0, 1.0, 1.0, 2.0, 2.0]
    num = [1.1, 1.1, 2.2, 2.2, 2.2]  # 1.1x den in 4 rounds of 5: its slow stretch began earlier
    res = {"group_step_s": {"all": {"a": 2.2, "b": 1.0}},
           "group_times_s": {"all": {"a": num, "b": den}}}
    assert bench_run.group_ratio(res, "a", "b") == pytest.approx(2.2)
    assert bench_run.paired_ratio(res, "a", "b") == pytest.approx(1.1)
    # round by round: rounds 4/1, 1/2, 2/4 give 0.5x (the sorted times paired would give 1x)
    res["group_times_s"]["all"] = {"a": [4.0, 1.0, 2.0], "b": [1.0, 2.0, 4.0]}
    assert bench_run.paired_ratio(res, "a", "b") == pytest.approx(0.5)
    # from the group group_ratio takes (the subject's own, before "all")
    res = {"group_step_s": {"all": {"a": 1.0, "b": 1.0}, "a": {"a": 3.0, "b": 1.0}},
           "group_times_s": {"all": {"a": [1.0] * 3, "b": [1.0] * 3},
                             "a": {"a": [3.0] * 3, "b": [1.0] * 3}}}
    assert bench_run.group_ratio(res, "a", "b") == pytest.approx(3.0)
    assert bench_run.paired_ratio(res, "a", "b") == pytest.approx(3.0)
    assert bench_run.paired_ratio(res, "a", "c") is None


def test_bench_groups_fit_the_memory_budget(tmp_path):
    # With no room for all carries at once, chains are timed in comparison groups, each with
    # the baselines of its ratios.
    result = bench_run.main(["--trees", "tiny", "--many-trees", "", "--reps", "1",
                             "--clippers", "agc,zclip", "--max-live-gb", "0"])
    groups = result["step"][0]["groups"]
    assert set(groups["agc"]) >= {"agc", "adam", "optax.adaptive_grad_clip"}
    assert set(groups["zclip"]) >= {"zclip", "adam", "clip_by_global_norm"}
    assert {r["num"] for r in result["step"][0]["ratios"]} >= {"agc", "zclip"}


def test_time_group_runs_steps_back_to_back_with_the_carry_chained():
    # --steps N: each member's turn is N calls, each fed the previous call's outputs, and its
    # time is per call
    calls = []

    def step(x):
        calls.append(x)
        return x + 1

    m = bench_run.Measured("count", step, lambda: (0,), ())
    times = bench_run.time_group([m], reps=2, warmup=1, steps=4)
    assert calls == list(range(12))  # 3 rounds of 4 steps, the carry chained throughout
    assert len(times["count"]) == 2 and all(t > 0 for t in times["count"])
    # the default is one call per round
    calls.clear()
    bench_run.time_group([m], reps=2, warmup=0)
    assert calls == [0, 1]


@pytest.mark.parametrize("guard", [optclip.skip_nonfinite, optclip.skip_on_spike])
def test_guard_step_copies_no_donated_state(guard):
    # The guards selected between the old and the new inner state after computing both; on
    # XLA:CPU that copied the donated moments (temp 143% of this tree against
    # optax.apply_if_finite's 100%). Taking the step inside a lax.cond, as apply_if_finite
    # does, leaves only the written-out updates.
    tree = {"a": jnp.ones((512, 256)), "b": jnp.ones((384, 256))}

    def temp(tx):
        c = bench_run.train_step(tx).lower(tree, tx.init(tree), tree).compile()
        return bench_run.temp_bytes(c)

    ours = temp(guard(optax.adam(1e-3)))
    theirs = temp(optax.apply_if_finite(optax.adam(1e-3), 10**9))
    assert ours <= theirs + 0.05 * tree_bytes(tree), (ours, theirs)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a claim about XLA:CPU")
def test_readme_claim_guards_copy_because_update_reads_the_old_state():
    # docs/benchmarks.md, "Why the guards cost 2x on XLA:CPU": selecting the kept state
    # after computing the update from the new one copies the donated state; computing it
    # from the kept one does not. If XLA changes this, that note must change.
    from bench import xla_probe

    temps = xla_probe.guard_copy()
    assert temps["as_guards"] > 0.99 and temps["from_kept"] < 0.01


def test_dump_step_writes_the_optimized_hlo_and_buffer_assignment(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "bench.dump_step", "agc", "tiny", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    assert "temp" in out
    names = [p.name for p in (tmp_path / "agc.tiny").iterdir()]
    assert any(n.endswith("after_optimizations.txt") for n in names)
    assert any(n.endswith("after_optimizations-buffer-assignment.txt") for n in names)


def test_bench_worker_process_compiles_a_chain_task():
    # The step trees' first-call rounds go through run_worker as (tree, name, "chain")
    # tasks: a real worker process compiles the chain's train step, as bench.run does.
    tx = REG["adam"].chain()
    tree = abstract_tree(TREES["tiny"]())
    here = bench_run.train_step(tx).lower(tree, jax.eval_shape(tx.init, tree), tree).compile()
    results, rest = bench_run.run_worker([("tiny", "adam", "chain")], max_s=120.0, backend=None)
    assert rest == [] and set(results) == {0}, results
    r = results[0]
    assert r["clipper"] == "adam" and r["tree"] == "tiny" and r["first_call_s"] > 0
    assert r["first_call_s"] == pytest.approx(r["lower_s"] + r["compile_s"])
    assert r["temp_bytes"] == bench_run.temp_bytes(here)


def test_many_leaves_compile_is_cut_off():
    tasks = [("tiny_many", "agc"), ("tiny_many", "clip_by_global_norm")]
    results, rest = bench_run.run_worker(tasks, max_s=0.01, backend=None)
    assert results == {0: {"timeout_s": 0.01}}
    assert rest == tasks[1:]


def test_many_leaves_cells_are_medians_of_offset_rounds(monkeypatch):
    # One first call on 1,000 leaves varies by more than the 2x target's margin (the same
    # code gave clip_by_value 1.80x and 2.19x in two runs): a cell is the median of
    # --many-reps rounds, every update once a round, each round's order offset by a share
    # of the updates. An update cut off in one round is not compiled again (on this tree or
    # a larger one); one that failed keeps its error (its later rounds are not sent to a
    # restarted worker). A stand-in worker gives each task a first call from a table: agc's
    # second compile runs past the cut-off, and Optax's global norm fails in its second on
    # the first tree.
    calls: list[list[tuple[str, str]]] = []
    times = {"clip_by_global_norm": [1.0, 3.0, 2.0], "zclip": [3.0, 3.0, 4.0], "agc": [5.0],
             "optax.clip_by_global_norm": [1.0, "error", 7.0]}
    seen: dict[tuple[str, str], int] = {}

    def fake_worker(tasks, max_s, backend):
        calls.append(list(tasks))
        results = {}
        for i, (t, k) in enumerate(tasks):
            n = seen.get((t, k), 0)
            seen[t, k] = n + 1
            row = times.get(k, [1.0] * 3)
            if n >= len(row):
                results[i] = {"timeout_s": max_s}
                return results, tasks[i + 1:]
            v = row[n] if t == "tiny_many" else 1.0
            if v == "error":
                results[i] = {"error": "ValueError: no"}
                continue
            results[i] = {"first_call_s": v, "lower_s": v / 4, "compile_s": v - v / 4,
                          "temp_bytes": 8, "tree_bytes": 80}
        return results, []

    monkeypatch.setattr(bench_run, "run_worker", fake_worker)
    out = bench_run.bench_many(["tiny_many", "many1000"], ["clip_by_global_norm", "zclip",
                                                           "agc"], 9.0, None, reps=3)
    keys = [k for _, k in calls[0][:6]]  # with Optax's AGC and global norm, the fused clip
    assert {"clip_by_global_norm", "zclip", "agc", "optax.clip_by_global_norm",
            "fused_global_norm"} <= set(keys) and len(set(keys)) == 6
    first = [k for _, k in calls[0]]
    assert first == keys + keys[2:] + keys[:2] + keys[4:] + keys[:4]
    # agc's second compile (round 2) is cut off: the worker restarts with the tasks after
    # it, less agc's third round
    cut = 6 + (keys.index("agc") - 2) % 6
    assert [k for _, k in calls[1]] == [k for k in first[cut + 1:] if k != "agc"]
    small = out["results"]["tiny_many"]
    assert list(small) == keys  # the rows in the tasks' order, cut off or not
    assert small["agc"] == {"timeout_s": 9.0, "samples_s": [5.0]}
    assert small["optax.clip_by_global_norm"] == {"error": "ValueError: no"}
    assert small["clip_by_global_norm"]["samples_s"] == [1.0, 3.0, 2.0]
    assert small["clip_by_global_norm"]["first_call_s"] == 2.0
    zc = small["zclip"]
    assert zc["first_call_s"] == 3.0 and zc["lower_s"] == 0.75 and zc["compile_s"] == 2.25
    # rounds 3/1, 3/3, 4/2: the median of each round's ratio, not the ratio of medians (1.5)
    assert bench_run.many_paired(small, "zclip") == 2.0
    big = out["results"]["many1000"]
    assert big["agc"]["skipped"] == "cut off on a smaller tree"
    assert big["optax.clip_by_global_norm"]["first_call_s"] == 1.0  # tried again there
    assert all(k != "agc" for c in calls[2:] for _, k in c)
    rows = {r["what"]: r for r in bench_run.targets([], out, ["zclip", "agc"])
            if r["tree"] == "tiny_many"}
    assert rows["first call: zclip update / clip_by_global_norm's"]["value"] == (
        "1.50x (per round 2.00x)")
    assert rows["first call: agc update / clip_by_global_norm's"]["met"] is False


def test_step_tree_first_calls_are_medians_of_rounds_in_fresh_processes(monkeypatch):
    # A chain's first call on the step trees is the median of --first-reps rounds, each in a
    # fresh worker process, each round's order offset by a share of the chains: in the
    # benchmark's own process, compiles after the first round ran about 10% slower
    # (bench/results/cpu_bench_medians/). The program timed is compiled in this process
    # (caches cleared before each compile), its first call kept apart.
    p = make_tree(TREES["tiny"]())
    events, compiled = [], []
    real_compile, real_clear = bench_run.lower_and_compile, jax.clear_caches
    monkeypatch.setattr(jax, "clear_caches", lambda: (events.append("clear"), real_clear())[1])

    def spy(fn, *a):
        events.append("compile")
        out = real_compile(fn, *a)
        compiled.append(out[0])
        return out

    monkeypatch.setattr(bench_run, "lower_and_compile", spy)
    rounds = []
    samples = {"adam": [4.0, 1.0, 2.0], "clip_by_global_norm": [2.0, 3.0, 9.0],
               "optax.clip_by_global_norm": [1.0, 1.0, 1.0], "fused_global_norm": [9.0] * 3,
               "optax.clip": [1.0, 2.0, 3.0], "zclip": [0.5, 0.5, 0.6]}

    def fake_worker(tasks, max_s, backend):
        rounds.append(tasks)
        r = len(rounds) - 1
        return {i: {"first_call_s": samples[k][r], "lower_s": samples[k][r] / 4,
                    "compile_s": samples[k][r] * 3 / 4} for i, (_, k, _) in enumerate(tasks)}, []

    monkeypatch.setattr(bench_run, "run_worker", fake_worker)
    keys = list(samples)
    ms = bench_run.compile_all(keys, p, p, first_reps=3, tree="tiny")
    # here: 2 floors, 3 global-norm clips alone, 6 chains, once each
    assert events == ["clear", "compile"] * 11, events
    assert [[k for _, k, _ in r] for r in rounds] == [keys, keys[2:] + keys[:2],
                                                      keys[4:] + keys[:4]]
    assert all(kind == "chain" and t == "tiny" for r in rounds for t, _, kind in r)
    for key in keys:
        info = ms[key].info
        assert info["first_call_samples_s"] == samples[key]
        assert info["first_call_s"] == sorted(samples[key])[1]
        assert info["lower_s"] == info["first_call_s"] / 4  # the median sample's parts
        assert info["first_call_here_s"] > 0
        assert ms[key].compiled is compiled[5 + keys.index(key)]
    assert len(ms["floor_read"].info["first_call_samples_s"]) == 1
    assert "first_call_here_s" not in ms["floor_read"].info


def test_bench_worker_compiles_each_task_afresh_and_chains_as_the_bench_does(monkeypatch,
                                                                              capsys):
    # The worker clears JAX's caches before each task (no trace of an earlier one is
    # reused), and compiles a chain's train step as bench.run does: the same program.
    import io

    from bench import worker

    clears = []
    real_clear = jax.clear_caches
    monkeypatch.setattr(jax, "clear_caches", lambda: (clears.append(1), real_clear())[1])
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(
        [["tiny", "clip_by_global_norm"], ["tiny", "adam", "chain"]])))
    worker.main()
    msgs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    done = [m for m in msgs if "i" in m]
    assert len(clears) == 2 and len(done) == 2 and all(m["first_call_s"] > 0 for m in done)
    tree = abstract_tree(TREES["tiny"]())
    tx = REG["adam"].chain()
    here = bench_run.train_step(tx).lower(tree, jax.eval_shape(tx.init, tree), tree).compile()
    assert done[1]["temp_bytes"] == bench_run.temp_bytes(here)


def test_median_sample_keeps_parts_that_sum_to_the_first_call():
    med = bench_run.median_sample
    assert med([(3.0, 1.0, 2.0), (1.0, 0.5, 0.5), (9.0, 4.0, 5.0)]) == (3.0, 1.0, 2.0)
    # an even count: the two middle samples' means, part by part
    assert med([(4.0, 1.0, 3.0), (1.0, 0.5, 0.5), (2.0, 1.5, 0.5), (9.0, 1.0, 8.0)]) == (
        3.0, 1.25, 1.75)


def test_bench_reps_must_be_positive():
    for flag in ("--first-reps", "--many-reps"):
        with pytest.raises(SystemExit):
            bench_run.main(["--quick", flag, "0"])


@pytest.mark.parametrize("name", _marked(CLIPPERS, TEMP_XFAIL, {"agc": AGC_GPU_TEMP}))
def test_chain_step_has_no_full_size_temporary(name):
    # The train step of chain(clipper, adam), params and state donated: its temp buffers are
    # < 5% of the tree (a fused clip is a scalar multiply inside adam's element-wise pass).
    tree = make_tree(TREES["small"]())
    tx = REG[name].chain()
    compiled = bench_run.train_step(tx).lower(tree, tx.init(tree), tree).compile()
    temp = bench_run.temp_bytes(compiled)
    assert temp < bench_run.TEMP_FRACTION * tree_bytes(tree), f"temp {temp} bytes"


def test_clip_by_value_step_holds_no_mask_of_the_tree():
    # Large leaves only (no concatenation of small ones). The exact `clipped` flag on a
    # non-finite step is a boolean any, whose operand XLA:CPU writes out: a 1-byte mask of
    # the whole tree, 25% of float32 updates, before static._chunked_any took it slice by slice.
    tree = {"a": jnp.ones((256, 1024)), "b": jnp.ones((300, 700))}
    tx = optax.chain(optclip.clip_by_value(0.1), optax.adam(1e-3))
    compiled = bench_run.train_step(tx).lower(tree, tx.init(tree), tree).compile()
    temp = bench_run.temp_bytes(compiled)
    assert temp < bench_run.TEMP_FRACTION * tree_bytes(tree), f"temp {temp} bytes"


def _eqns(jaxpr, skip=()):
    """Every equation of ``jaxpr`` and of its sub-jaxprs, except inside the primitives
    named in ``skip`` (their branches or bodies)."""
    for e in jaxpr.eqns:
        if e.primitive.name in skip:
            continue
        yield e
        for v in e.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                j = getattr(sub, "jaxpr", None)
                if j is not None:
                    yield from _eqns(getattr(j, "jaxpr", j), skip)


def _reductions_outside_conds(jaxpr, size):
    """The reduce equations over ``size`` elements that run on every step: not inside a
    lax.cond's branch (nor a loop's body)."""
    return [e.primitive.name for e in _eqns(jaxpr, skip=("cond", "while"))
            if e.primitive.name.startswith("reduce")
            and any(int(np.prod(v.aval.shape)) == size for v in e.invars)]


def test_clip_by_value_reads_the_updates_twice_when_nothing_is_clamped():
    # The norm before (a sum on every step) and the largest magnitude (the finite branch of
    # the clamp flag's cond) are needed on every step; the norm after the clamp only on a step
    # that clamped. It used to be taken on every step: 1.57x optax.clip on ResNet-50, 1.36x now.
    tree = {"w": jnp.ones((300, 7))}
    tx = optclip.clip_by_value(1.0)
    jaxpr = jax.make_jaxpr(tx.update)(tree, tx.init(None)).jaxpr
    assert _reductions_outside_conds(jaxpr, 2100) == ["reduce_sum"]


@pytest.mark.skipif(not ON_CPU, reason="the gather is XLA:CPU's (norms.split_flat): elsewhere "
                    "the slices stay, which XLA:GPU fuses (a selection by mask, forced on an "
                    "H200, made the per-leaf and agc steps 5-18% slower: "
                    "bench/results/h200_2f30d35/split_*.log)")
@pytest.mark.parametrize("name", ["leaf_norms", "clip_by_leaf_norm", "clip_by_block_rms",
                                  "adagc", "agc", "clippy"])
def test_per_leaf_results_reach_many_leaves_without_a_slice_each(name):
    # XLA:CPU compiles each distinct kernel on its own (several ms each); a slice of the flat
    # vector of norms at each leaf's offset was one distinct kernel per leaf: 1,000 leaves
    # spent about 6 s compiling them. Each leaf now gathers its part by constant indices.
    tree = {f"l{i:03d}": jnp.ones((6, 3)) for i in range(96)}
    if name == "leaf_norms":
        lowered = jax.jit(optclip.leaf_norms).lower(tree)
    else:
        tx = REG[name].alone()
        lowered = jax.jit(lambda u, s, p: tx.update(u, s, p)).lower(tree, tx.init(tree), tree)
    # slices of a vector with a row for every leaf (a slice of a leaf's own small array, the
    # same slice for every leaf, would not be one distinct kernel per leaf)
    operands = re.findall(r"stablehlo\.slice .*: \(tensor<(\d+)", lowered.as_text())
    assert sum(int(n) >= 96 for n in operands) < 96 // 8


def _n_eqns(jaxpr) -> int:
    """The equations of ``jaxpr``, those of the jaxprs inside them included."""
    from jax._src import core as jax_core  # jaxprs_in_params: no public equivalent

    return sum(1 + sum(_n_eqns(j) for j in jax_core.jaxprs_in_params(e.params))
               for e in jaxpr.eqns)


# equations per small leaf, at most (at 3bdf577: 9, and 12 for clippy; at ce471c0 5 and 7,
# where the other platforms' branch of norms.split_flat took a slice and a reshape for each
# leaf, one lax.split for all now; the global norm's 2 are each leaf's multiply by the factor
# and its conversion)
_EQNS_PER_LEAF = {"clip_by_leaf_norm": 3, "clip_by_block_rms": 3, "agc": 3, "adagc": 3,
                  "clippy": 7}


@pytest.mark.parametrize("name", list(_EQNS_PER_LEAF))
def test_trace_work_per_small_leaf(name):
    # Tracing (Python) was about half of a per-unit clipper's first call on 1,000 small
    # leaves (trace + lower 2.1-2.9 s, against 0.7 s for the global norm): NumPy-style
    # indexing to take each leaf's part of the flat vector of norms (with its index
    # normalisation), and a stack of every leaf's size. The equations a leaf adds are a
    # deterministic measure of that work; the first calls, with their trace + lower part, are
    # in bench/results/cpu_trace/ (python -m bench.compile_probe --alone).
    def n(leaves):
        tree = {f"b{i:03d}": jnp.ones((8,)) for i in range(leaves)}
        tx = REG[name].alone()
        return _n_eqns(jax.make_jaxpr(tx.update)(tree, tx.init(tree), tree).jaxpr)

    assert (n(80) - n(40)) / 40 <= _EQNS_PER_LEAF[name]


@pytest.mark.skipif(not ON_CPU, reason="the gather is XLA:CPU's (norms.split_flat)")
@pytest.mark.parametrize("name", ["clip_by_leaf_norm", "clip_by_block_rms", "adagc", "agc"])
def test_large_leaves_of_one_shape_share_their_kernels(name):
    # XLA:CPU compiles identical kernels once. Large leaves took their norm or scale, and the
    # overflow rescue its scales, by a slice at the leaf's offset, which XLA fused (with the
    # element-wise work before it) into kernels of their own: GPT-2's clip_by_leaf_norm chain
    # compiled 239 distinct kernels, the global-norm chain 84, and its first call took 5.53 s
    # against 2.18 s (bench/results/cpu_gather/compile_probe.log). Leaves of one
    # shape must now compile the same kernels, however many there are (before: 3-4 more
    # distinct kernels for each leaf; the vector of agc's units, its length, may change a
    # few).
    def distinct(n):
        tree = {f"l{i:02d}": jnp.ones((300, 256)) for i in range(n)}  # each > SMALL_LEAF
        tx = REG[name].chain()
        return fused_counts(
            bench_run.train_step(tx).lower(tree, tx.init(tree), tree).compile().as_text())[1]

    few, many = distinct(8), distinct(16)
    assert many < few + 8 // 2, (few, many)


def _gather_kernel_sizes(hlo: str) -> list[int]:
    """The number of instructions in each fused computation of ``hlo`` that holds a
    gather."""
    blocks = re.findall(r"^%(\S+) \([^\n]*\{\n(.*?)\n\}", hlo, re.M | re.S)
    return [body.count("\n") + 1 for name, body in blocks
            if ("fused" in name or "wrapped" in name) and " gather(" in body]


@pytest.mark.skipif(not ON_CPU, reason="the gather and its lax.cond are XLA:CPU's "
                    "(norms.split_flat)")
@pytest.mark.parametrize("name", ["clip_by_leaf_norm", "clip_by_block_rms", "adagc", "agc",
                                  "clippy"])
def test_per_leaf_factors_are_computed_once_not_in_each_leafs_kernel(name):
    # XLA fuses cheap element-wise work into every consumer: each leaf's gather of its factor
    # from the vector of factors computed the whole per-unit rule again inside its own
    # kernel (on 36492be: 8, 17, 57 and 20 instructions in each leaf's kernel for these
    # clippers; clippy had no gathers). The vector is now written out once, behind a
    # lax.cond (norms._written_out), and each gather kernel holds the gather and little
    # else.
    # Each leaf's gather is now fused with the leaf's own multiply (and clippy's select of
    # non-finite elements): its kernel holds the leaf, the vector, the index, the gather, a
    # bitcast and the multiply (8 with clippy's is_finite and select).
    tree = {f"l{i:02d}": jnp.ones((6, 3)) for i in range(48)}
    tx = REG[name].alone()
    hlo = jax.jit(lambda u, s, p: tx.update(u, s, p)).lower(
        tree, tx.init(tree), tree).compile().as_text()
    sizes = _gather_kernel_sizes(hlo)
    # one gather kernel per leaf, and a few of the norms' own (their order, the rescue's)
    assert len(sizes) >= 48 and sum(n > 8 for n in sizes) <= 3, sorted(sizes)[-8:]


@pytest.mark.skipif(not ON_CPU, reason="the gather at each leaf's shape is XLA:CPU's "
                    "(norms.split_flat)")
@pytest.mark.parametrize("name", ["clip_by_leaf_norm", "clip_by_block_rms", "adagc", "agc",
                                  "clippy"])
def test_each_small_leaf_is_scaled_by_one_kernel(name):
    # A leaf took its factors by a gather of its units, a kernel of its own (XLA does not fuse
    # a gather into a consumer that reads each element many times, as a broadcast does), and
    # then a second kernel multiplied it: two kernels a leaf, against the global norm's one,
    # and compile time grew with them (agc's update on 5,000 small leaves 25.0 s, 19.3 s with
    # one: bench/results/cpu_full_gather/). Gathered at the leaf's own shape, the factors fuse
    # into the multiply. Leaves of one unit (clip_by_leaf_norm's) included.
    def kernels(n):
        tree = {f"l{i:02d}": jnp.ones((6, 3)) for i in range(n)}
        tx = REG[name].alone()
        return fused_counts(jax.jit(lambda u, s, p: tx.update(u, s, p)).lower(
            tree, tx.init(tree), tree).compile().as_text())[0]

    assert (kernels(96) - kernels(48)) / 48 <= 1.1


def test_clippy_large_tensors_take_their_factor_by_no_gather():
    # A large tensor (one piece of its own) took its factor by a gather from the vector of
    # every factor, a kernel of its own on XLA:CPU (53 on ResNet-50); it now takes it from
    # its own piece's min, in the kernel that scales it (bench/results/cpu_clippy_trace/).
    # Four such tensors: 4 gathers before, none now.
    tree = {f"l{i}": jnp.ones((270, 256 + i)) for i in range(4)}
    tx = REG["clippy"].alone()
    hlo = jax.jit(lambda u, s, p: tx.update(u, s, p)).lower(
        tree, tx.init(tree), tree).compile().as_text()
    assert " gather(" not in hlo


@pytest.mark.parametrize("name", _marked(["agc", "clip_by_leaf_norm", "adagc"], {},
                                         {"agc": AGC_GPU_TEMP}))
def test_many_large_leaves_of_one_shape_write_no_tree_out(name):
    # Large leaves keep the slice of their per-unit results that XLA fuses into their own
    # kernel: taken by selection (as small leaves' are), XLA:CPU wrote agc's whole clipped
    # gradients out (100% of the GPT-2 tree in temporaries, 2.7x Adam's step).
    tree = {f"layer{i}": jnp.ones((300, 256)) for i in range(8)}
    tx = REG[name].chain()
    compiled = bench_run.train_step(tx).lower(tree, tx.init(tree), tree).compile()
    assert bench_run.temp_bytes(compiled) < bench_run.TEMP_FRACTION * tree_bytes(tree)


@pytest.mark.parametrize("name", _marked(CLIPPERS, DONATE_XFAIL))
def test_fresh_chain_state_is_donatable(name):
    tree = make_tree(TREES["tiny"]())
    assert bench_run.shared_buffers(REG[name].chain().init(tree)) == []


def test_fused_value_floor_keeps_the_stats_it_is_a_floor_for():
    # bench.clippers.fused_value is the floor README and docs/benchmarks.md cite for
    # clip_by_value's step: it must compute what clip_by_value reports (the norm, the clamp
    # flag, the norm after a clamp), and clamp as optax.clip does.
    from bench.clippers import fused_value

    # "c": 8,192 elements, two rows of 4,096 for stats="one_pass"
    g = {"a": jnp.array([0.25, -0.02, 0.03]), "b": jnp.array([[0.001, -0.5]], jnp.bfloat16),
         "c": jnp.linspace(-0.05, 0.05, 8192).reshape(2, 4096)}
    x = np.concatenate([np.asarray(v, np.float64).ravel() for v in jax.tree.leaves(g)])
    # 0.3: only -0.5 lies outside (the flag takes magnitudes); 0.1: both. Its diagnostics
    # take one stat alone (the other 0 or False), or the two from one variadic reduction.
    for bound, clamps in ((0.1, True), (0.3, True), (1.0, False)):
        for stats in ("both", "norm", "max", "one_pass"):
            tx = fused_value(bound, norm_after=stats == "both", stats=stats)
            out, (norm, clipped, after) = jax.jit(tx.update)(g, tx.init(g))
            want = np.linalg.norm(x) if stats != "max" else 0.0
            assert float(norm) == pytest.approx(want, rel=1e-6)
            assert bool(clipped) is (clamps and stats != "norm")
            want = np.linalg.norm(np.clip(x, -bound, bound)) if stats == "both" else 0.0
            assert float(after) == pytest.approx(want, rel=1e-6)
        ref, _ = optax.clip(bound).update(g, None)
        for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
            assert o.dtype == r.dtype and np.array_equal(np.asarray(o), np.asarray(r))


def _flax_units(a):
    """AGC's units for Flax layouts: all axes but the last; a vector or scalar is one unit."""
    return tuple(range(a.ndim - 1)) if a.ndim > 1 else None


_SAME_WORK = {"fused_leaf_norm": lambda: optclip.clip_by_leaf_norm(1.0),
              "fused_agc": lambda: optclip.agc(0.01), "stacked_agc": lambda: optclip.agc(0.01),
              "fused_clippy": lambda: optclip.clippy(0.1, 1e-7),
              "stacked_clippy": lambda: optclip.clippy(0.1, 1e-7)}


@pytest.mark.parametrize("name", list(_SAME_WORK))
def test_hand_fused_compile_references_compute_their_clipper(name):
    # docs/benchmarks.md sets optclip's first calls against these references: each must do
    # its clipper's work (per leaf, or on stacks of the leaves of one shape), checked against
    # NumPy written from the papers' formulas and against the optclip clipper itself. Every
    # shape (repeated shapes are stacked together; a 3-D leaf, whose AGC units are its last
    # axis; a scalar) has a leaf that clips; one weight is zero (AGC's eps, Clippy's
    # lambda_abs), one update is zero.
    rng = np.random.default_rng(3)
    shapes = [(3, 4), (5,), (), (3, 4), (2, 3, 4), (5,), (3, 4), (1,), (2, 3, 4), ()]
    big = {1, 2, 3, 4, 5, 7}
    g = {f"l{i}": jnp.asarray(rng.normal(size=s) * (3.0 if i in big else 0.001)
                              * (30.0 if not s else 1.0), jnp.float32)
         for i, s in enumerate(shapes)}
    g["l9"] = jnp.zeros((), jnp.float32)
    w = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in g.items()}
    w["l3"] = jnp.zeros((3, 4), jnp.float32)
    tx = REG[name].alone()
    out, _ = jax.jit(tx.update)(g, tx.init(w), w)
    gn = {k: np.asarray(v, np.float64) for k, v in g.items()}
    wn = {k: np.asarray(v, np.float64) for k, v in w.items()}
    def ref(k):
        if name == "fused_leaf_norm":
            return refs.leaf_clip([gn[k]], 1.0)[0]
        if name.endswith("agc"):
            return refs.agc_clip(gn[k], wn[k], 0.01, 1e-3, _flax_units(gn[k]))
        return gn[k] * refs.clippy_sigma(gn[k], wn[k], 0.1, 1e-7)

    same = _SAME_WORK[name]()
    theirs, _ = jax.jit(same.update)(g, same.init(w), w)
    changed = set()
    for k in g:
        want = ref(k)
        assert out[k].shape == g[k].shape and out[k].dtype == g[k].dtype
        np.testing.assert_allclose(np.asarray(out[k]), want, rtol=2e-6, atol=1e-30)
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(theirs[k]), rtol=2e-6,
                                   atol=1e-30)
        if not np.allclose(want, np.asarray(g[k])):
            changed.add(len(shapes[int(k[1:])]))
    assert changed == {0, 1, 2, 3}  # leaves of every rank clipped: not a no-op
    # an empty leaf passes through (optclip's clippers take one)
    e = {"e": jnp.zeros((2, 0), jnp.float32), "f": jnp.zeros((0,), jnp.float32)}
    out, _ = jax.jit(tx.update)(e, tx.init(e), e)
    assert all(out[k].shape == e[k].shape for k in e)


_CPU_HLO = pytest.mark.skipif(
    not ON_CPU, reason="constant_outputs reads XLA:CPU's optimized HLO: XLA:GPU's emits such an "
                       "output otherwise, and it found none on an H200 where there were two")


@_CPU_HLO
def test_constant_outputs_finds_a_state_field_known_at_compile_time():
    tree = make_tree(TREES["tiny"]())
    tx = optax.chain(gn_probe.const_state(), optax.adam(1e-3))
    compiled = bench_run.train_step(tx).lower(tree, tx.init(tree), tree).compile()
    # outputs: the 3 params, then adam's state after const_state's two scalars
    assert bench_run.constant_outputs(compiled) == [3, 4]
    tx = optax.adam(1e-3)
    compiled = bench_run.train_step(tx).lower(tree, tx.init(tree), tree).compile()
    assert bench_run.constant_outputs(compiled) == []


@_CPU_HLO
@pytest.mark.parametrize("name", CLIPPERS)
def test_no_output_of_a_chain_step_is_a_compile_time_constant(name):
    # A float threshold made the stats' `threshold` and `invalid_threshold` constants of the
    # compiled step; on an H200 two such outputs cost adam 1.2-1.5x its step
    # (bench/results/h200_2f30d35/gn_probe_2.log and _3.log, adam_constout; without them the
    # global-norm chain went from 1.59x to 1.10x the hand-fused clip on GPT-2, gn_probe_3.log).
    tree = make_tree(TREES["tiny"]())
    tx = REG[name].chain()
    compiled = bench_run.train_step(tx).lower(tree, tx.init(tree), tree).compile()
    assert bench_run.constant_outputs(compiled) == []


@pytest.mark.parametrize("name", CLIPPERS)
def test_no_chain_step_lowered_for_a_gpu_holds_a_loop(name):
    # On a GPU a while loop runs trip by trip, each with its own kernel launches and a check
    # of its condition: autoclip's sketch percentile, a binary search (jnp.searchsorted),
    # cost its chain 0.5-0.7 ms a step on an H200, 1.17-1.22x the global-norm chain
    # (bench/results/h200_e3f0246/). Lowered for CUDA here, on any machine. (XLA:CPU's own
    # branch of clip_by_value keeps its loop over slices, on non-finite steps: see
    # static._chunked_any.)
    tree = make_tree(TREES["tiny"]())
    tx = REG[name].chain()
    traced = bench_run.train_step(tx).trace(tree, tx.init(tree), tree)
    assert traced.lower(lowering_platforms=("cuda",)).as_text().count("stablehlo.while") == 0


def _train_step_temp_bytes(tx, tree):
    def f(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    compiled = jax.jit(f, donate_argnums=(0, 1)).lower(tree, tx.init(tree), tree).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_clip_fuses_into_adam_without_a_full_size_buffer():
    # Leaves above norms.SMALL_LEAF, so that they are reduced one by one as in a real model.
    tree = {"a": jnp.ones((512, 256)), "b": jnp.ones((384, 256))}
    tree_nbytes = sum(x.nbytes for x in jax.tree.leaves(tree))
    ours = _train_step_temp_bytes(
        optax.chain(optclip.clip_by_global_norm(1.0), optax.adam(1e-3)), tree)
    theirs = _train_step_temp_bytes(
        optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)), tree)
    adam = _train_step_temp_bytes(optax.adam(1e-3), tree)
    # Optax writes the clipped gradients out on XLA:CPU (a temporary the size of the tree;
    # XLA:GPU fuses its clip); optclip's scale is one multiply inside adam's element-wise pass.
    assert theirs >= tree_nbytes // 2 or not ON_CPU
    assert ours <= adam + tree_nbytes // 20


def test_clip_by_value_chain_writes_out_no_clamped_tree():
    # The norms after the clamp and the clamp itself used to share one expression (and its
    # bounds' broadcast), which XLA wrote out in full: temp 100% of the tree. What remains
    # is the 1-byte mask in the non-finite branch (25% of a float32 tree).
    tree = {"a": jnp.ones((512, 512)), "b": jnp.ones((1024, 256))}
    tx = REG["clip_by_value"].chain()
    compiled = bench_run.train_step(tx).lower(tree, tx.init(tree), tree).compile()
    assert bench_run.temp_bytes(compiled) < 0.3 * tree_bytes(tree)


@pytest.mark.parametrize("name", ["clip_by_global_norm", "zclip", "clip_by_value"])
def test_layers_of_one_shape_share_no_written_out_broadcast(name):
    # Several leaves of one shape (a model's layers): the rescue's scale, or clip_by_value's
    # bounds, broadcast once and shared among them, was written out in full by XLA:CPU
    # (28.8 MB on the GPT-2 tree; 100% of this tree for clip_by_value).
    tree = {f"layer{i}": jnp.ones((512, 256)) for i in range(4)}
    tx = REG[name].chain()
    compiled = bench_run.train_step(tx).lower(tree, tx.init(tree), tree).compile()
    # clip_by_value keeps the 1-byte mask of its non-finite branch (25% of a float32 tree)
    bound = 0.3 if name == "clip_by_value" else bench_run.TEMP_FRACTION
    assert bench_run.temp_bytes(compiled) < bound * tree_bytes(tree)


@pytest.mark.parametrize("bounds", [(0.5,), (0.5, -0.25)], ids=["symmetric", "min_value"])
def test_clip_by_value_reductions_do_not_grow_with_small_leaves(bounds):
    # XLA:CPU's compile time grows with the number of separate reductions; small leaves are
    # reduced together (norms.grouped_total). Counted in the lowered program: a per-leaf
    # reduction anywhere (the non-finite branch's indicator, the clamped norm) would make
    # the count grow with the leaves.
    def count(n):
        tree = {f"l{i:04d}": jnp.ones((4, 8)) for i in range(n)}
        tx = optclip.clip_by_value(*bounds)
        text = jax.jit(tx.update).lower(tree, tx.init(tree)).as_text()
        return text.count("stablehlo.reduce")

    assert count(40) == count(10)


def _operand_shapes(jaxpr, prims=("reduce",)):
    """The operand shapes of every equation whose primitive's name starts with one of
    ``prims``, branches and sub-jaxprs included."""
    return [tuple(v.aval.shape) for e in _eqns(jaxpr) if e.primitive.name.startswith(prims)
            for v in e.invars]


@pytest.mark.parametrize("name", ["agc", "clip_by_leaf_norm", "clip_by_block_rms", "adagc",
                                  "clippy"])
def test_unit_norms_reductions_do_not_grow_with_small_leaves(name):
    # agc's unit-wise norms reduced every small kernel on its own (2 per leaf, 3 with the
    # rescue): 34 s to compile at 1,000 mixed leaves. Small arrays of one shape are stacked
    # and reduced together now. clippy took each small tensor's min of ratios on its own
    # (one reduction per leaf); they are stacked as rows and reduced along the rows now.
    def shapes(n, prims=("reduce",)):
        tree = {f"l{i:04d}": jnp.ones((4, 9)) for i in range(n)}
        tx = REG[name].alone()
        jaxpr = jax.make_jaxpr(tx.update)(tree, tx.init(tree), tree).jaxpr
        return _operand_shapes(jaxpr, prims)

    few, many = shapes(10), shapes(40)
    assert (4, 9) not in few + many
    assert len(many) == len(few) > 0


@pytest.mark.parametrize("name", ["agc", "clip_by_leaf_norm"])
def test_small_leaves_of_one_shape_are_reduced_without_a_copy_each(name):
    # Small leaves used to be laid out as rows (unit-wise ones through a transposed copy),
    # zero-padded to a power-of-two width and stacked: a pad or transpose kernel per leaf
    # (about 2,000 of agc's 7,400 kernels at 1,000 mixed leaves). Leaves of one shape are
    # now stacked as they are and reduced over the same dims.
    tree = {f"l{i:04d}": jnp.ones((4, 9)) for i in range(40)}
    tx = REG[name].alone()
    jaxpr = jax.make_jaxpr(tx.update)(tree, tx.init(tree), tree).jaxpr
    copied = _operand_shapes(jaxpr, ("pad", "transpose"))
    assert not [s for s in copied if int(np.prod(s)) == 36], copied


@pytest.mark.parametrize("name", ["agc", "clip_by_leaf_norm", "clip_by_block_rms", "adagc"])
def test_small_leaves_are_stacked_once_not_again_in_the_rescues_branches(name):
    # The per-unit norms stacked the small leaves for their sum, and again inside each of the
    # rescue's two lax.cond branches (their max and their rescaled sum): three stacks of
    # every small leaf, and their compile time (agc's update alone on 1,000 small leaves:
    # 8.50 s, 6.45 s stacked once; bench/results/cpu_packed). The branches take the stacks
    # made outside them now.
    tree = {f"l{i:04d}": jnp.ones((4, 9)) for i in range(40)}
    tx = REG[name].alone()
    jaxpr = jax.make_jaxpr(tx.update)(tree, tx.init(tree), tree).jaxpr
    stacks = [e for e in _eqns(jaxpr) if e.primitive.name in ("stack", "concatenate")
              and any(tuple(v.aval.shape) in ((4, 9), (1, 4, 9)) for v in e.invars)]
    assert len(stacks) == 1, [len(e.invars) for e in stacks]


def test_clippy_stacks_its_small_tensors_once_for_their_norms_and_ratios():
    # clippy's stats stacked its small tensors for their norms, and its ratios concatenated
    # them again, with their weights, and took a segment min: on 1,000 to 5,000 small leaves
    # its update held 5.02x the tree in temporaries. One stack of the updates and one of
    # the weights now serve both (2.01x): tensors of one size as they are (here 40 of 36
    # elements), those of sizes no other has zero-padded to a power-of-two width (5, 6 and
    # 7 elements, to 8), and one alone in its width (100) left as it is, with no pad.
    tree = {**{f"l{i:04d}": jnp.ones((4, 9)) for i in range(40)},
            "p5": jnp.ones(5), "p6": jnp.ones((2, 3)), "p7": jnp.ones(7),
            "alone": jnp.ones((10, 10))}
    tx = REG["clippy"].alone()
    jaxpr = jax.make_jaxpr(tx.update)(tree, tx.init(tree), tree).jaxpr
    eqns = list(_eqns(jaxpr))

    def copies(shape, prims=("stack", "concatenate")):
        # (a tensor's row, raveled: as it is, or with a leading dim of 1)
        return [e for e in eqns if e.primitive.name in prims
                and any(tuple(v.aval.shape) in (shape, (1, *shape)) for v in e.invars)]

    assert len(copies((36,))) == 2, [len(e.invars) for e in copies((36,))]
    assert len(copies((8,))) == 2, [len(e.invars) for e in copies((8,))]  # the padded rows
    assert not copies((100,), ("pad",))


def test_clippy_update_on_many_small_leaves_holds_two_trees_at_most():
    # the two stacks above (updates and weights); 5.18x the tree before, on this tree
    tx = REG["clippy"].alone()

    def temp(tree):
        compiled = jax.jit(tx.update, donate_argnums=(0, 1)).lower(
            tree, jax.eval_shape(tx.init, tree), tree).compile()
        return bench_run.temp_bytes(compiled) / tree_bytes(tree)

    assert temp(abstract_tree(mixed_leaves_shapes(240))) < 2.5
    # a small tensor alone in its size is not copied into a padded stack (5.92x the tree
    # when it was, 3.64x with the segment min before), nor written out for the norm's
    # overflow rescue behind a lax.cond (1.006x; its ratios' min and norm now come from one
    # pass over it)
    assert temp(abstract_tree({"a": (40000,)})) < 0.05


@pytest.mark.parametrize("name", ["clip_by_global_norm", "zclip", "autoclip", "skip_on_spike"])
def test_global_norms_small_leaves_are_concatenated_once(name):
    # The combined norm concatenated its small leaves in each of its three reductions (the
    # sum, and inside the rescue's lax.conds the max and the rescaled sum): the update alone
    # on 2,000 small leaves compiled in 6.95 s, 5.81 s concatenated once (medians of five,
    # bench/results/cpu_small_concat). The conds take the concatenation made outside them.
    tree = {f"l{i:04d}": jnp.ones((4, 9)) for i in range(40)}
    tx = REG[name].alone()
    jaxpr = jax.make_jaxpr(tx.update)(tree, tx.init(tree), tree).jaxpr
    concats = [e for e in _eqns(jaxpr) if e.primitive.name == "concatenate"
               and any(tuple(v.aval.shape) == (36,) for v in e.invars)]
    assert len(concats) == 1, [len(e.invars) for e in concats]


@pytest.mark.parametrize("min_value", [None, -0.2])
@pytest.mark.parametrize("with_complex", [False, True])
def test_clip_by_value_concatenates_its_small_leaves_three_times_not_seven(min_value,
                                                                          with_complex):
    # its norm before, its clamp flag's two branches (the max on a finite step, the any on a
    # non-finite one, of which XLA:CPU's takes slices and lowers the other backends' form
    # too) and its norm after the clamp each concatenated the small leaves, the norms three
    # times over (with min_value; once for the norm after without it): seven or nine
    # concatenations (b50ea1b). Now the norms concatenate once each (their magnitudes, and for
    # the norm after the arrays it clamps, complex ones apart), and the clamp flag once for
    # both branches. On 2,000 small leaves its update's first call went from 17.9 s to 12.9 s
    # (bench/results/cpu_small_concat/compile_probe_value.log).
    tree = {f"l{i:04d}": jnp.ones((4, 9)) for i in range(40)}
    if with_complex:
        tree.update({f"c{i}": jnp.ones((2, 3), jnp.complex64) for i in range(3)})
    tx = optclip.clip_by_value(0.1, min_value=min_value)
    jaxpr = jax.make_jaxpr(tx.update)(tree, tx.init(tree)).jaxpr
    concats = [e for e in _eqns(jaxpr) if e.primitive.name == "concatenate"
               and any(tuple(v.aval.shape) == (36,) for v in e.invars)]
    assert len(concats) == 3, [len(e.invars) for e in concats]
    # the norm after the clamp's complex group: concatenated once, apart
    apart = [e for e in _eqns(jaxpr) if e.primitive.name == "concatenate"
             and all(v.aval.dtype == jnp.complex64 for v in e.invars)]
    assert len(apart) == (1 if with_complex else 0), [len(e.invars) for e in apart]


@pytest.mark.parametrize("min_value", [None, -0.2])
def test_clip_by_value_nonfinite_flag_slices_each_array_once(min_value):
    # A non-finite step's clamp flag (XLA:CPU's form, static._chunked_any) loops over slices
    # of every array. Its first step was taken outside the loop, to give the carry the body's
    # type, which compiled the body's slices and kernels twice: on GPT-2, 839 fused kernels
    # (100 distinct) against 783 (92) once the carry is typed directly, and the chain's first
    # call 4.06 s against 3.48 s (bench/results/cpu_value_loop/compile_probe.log).
    big = _n.SMALL_LEAF + 1
    tree = {"a": jax.ShapeDtypeStruct((big,), jnp.float32),
            "b": jax.ShapeDtypeStruct((2, big), jnp.float32),
            "c": jax.ShapeDtypeStruct((3, big), jnp.bfloat16),
            **{f"s{i}": jax.ShapeDtypeStruct((4, 9), jnp.float32) for i in range(5)}}
    tx = optclip.clip_by_value(0.1, min_value=min_value)
    jaxpr = jax.make_jaxpr(tx.update)(tree, tx.init(tree)).jaxpr
    slices = [e for e in _eqns(jaxpr) if e.primitive.name == "dynamic_slice"]
    # one per array: the three large ones and the small ones' concatenation
    assert len(slices) == 4, [tuple(e.invars[0].aval.shape) for e in slices]


def test_zero_probe_runs_and_zeroes_every_fourth_leaf(capsys):
    from bench import zero_probe

    g = {f"l{i}": jnp.ones((3,)) for i in range(9)}
    z = zero_probe.with_zero_leaves(g)
    assert [k for k, v in z.items() if not np.any(np.asarray(v))] == ["l0", "l4", "l8"]
    zero_probe.main(["--trees", "tiny", "--reps", "1", "--only", "adam,clip_by_leaf_norm"])
    out = capsys.readouterr().out
    assert "tiny clip_by_leaf_norm" in out and "with zero leaves" in out


def test_compile_probe_runs_each_first_call_in_a_fresh_process(capsys):
    from bench import compile_probe

    compile_probe.main(["--trees", "tiny", "--clippers", "clip_by_leaf_norm", "--reps", "1",
                        "--alone"])
    out = capsys.readouterr().out
    row = [ln for ln in out.splitlines() if ln.startswith("| tiny | `clip_by_leaf_norm`")]
    assert len(row) == 1 and "| this |" in row[0], out
    cells = row[0].strip("| ").split(" | ")
    fused, distinct = (int(c) for c in cells[-2:])
    assert fused >= distinct > 0
    first, traced = float(cells[3].split()[0]), float(cells[4].split()[0])
    assert 0 < traced < first  # trace + lower is a part of the first call


def test_eager_probe_runs_and_later_eager_calls_compile_nothing():
    # in a subprocess: the probe turns on JAX's compile log for its whole process
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "bench.eager_probe", "--calls", "3"],
                         capture_output=True, text=True, env=env, check=True, timeout=600).stdout
    rows = [ln for ln in out.splitlines() if "first call" in ln]
    assert len(rows) == 13, out
    assert all(ln.endswith("(0 compiled)") for ln in rows), out


def test_readme_bench_tables_are_the_committed_runs_output():
    # README's CPU tables are `python -m bench.readme_tables` on the committed results.json:
    # a figure edited by hand, or a new run committed without them, fails here.
    from bench import readme_tables

    root = Path(__file__).resolve().parent.parent
    result = json.loads((root / "bench" / "results" / "results.json").read_text())
    got = readme_tables.readme_block((root / "README.md").read_text())
    assert got == readme_tables.tables(result)


def test_readme_tables_cells_and_bold_misses():
    # A synthetic run with known answers for every kind of cell: ratios with bounds (over
    # and under), per-round ratios that differ from the ratio of medians, first calls as a
    # ratio, as seconds over the global-norm chain and both, judged by the bench's targets
    # (the "(chains)" row apart), temporaries, and the many-leaves table.
    from bench import readme_tables

    gn = "clip_by_global_norm"

    def entry(step_s, first_s, temp=0.001):
        return {"step_s": step_s, "first_call_s": first_s, "temp_fraction": temp}

    step = {"adam": 1.0, gn: 1.1, "fused_global_norm": 1.0, "clip_by_block_rms": 1.2,
            "clip_by_leaf_norm": 1.1, "optax.clip_by_global_norm": 2.0, "agc": 1.5,
            "optax.adaptive_grad_clip": 1.4}
    first = {"adam": 2.0, gn: 3.0, "fused_global_norm": 2.5, "clip_by_block_rms": 3.5,
             "clip_by_leaf_norm": 6.0, "optax.clip_by_global_norm": 2.4, "agc": 7.0,
             "optax.adaptive_grad_clip": 4.0}
    temps = {"clip_by_block_rms": 0.002, "clip_by_leaf_norm": 0.03, "agc": 0.004}
    # two rounds: the second slower for the global-norm chain alone, so that the median of
    # the rounds' ratios differs from the ratio of the medians
    # (clip_by_leaf_norm's rounds not recorded: its row shows no per-round ratios)
    rounds = {n: [t, t * (3.0 if n == gn else 1.0)] for n, t in step.items()
              if n != "clip_by_leaf_norm"}
    res = {"tree": "gpt2",
           "entries": {n: entry(step[n], first[n], temps.get(n, 0.001)) for n in step},
           "group_step_s": {"all": step}, "group_times_s": {"all": rounds},
           "ratios": [{"num": gn, "den": "fused_global_norm", "bound": 1.03},
                      {"num": "clip_by_block_rms", "den": gn, "bound": 1.05},
                      {"num": "clip_by_leaf_norm", "den": gn, "bound": 1.05},
                      {"num": "agc", "den": "adam", "bound": 1.35}]}
    targets = [
        {"tree": "gpt2", "what": "first call: clip_by_leaf_norm / adam", "met": False},
        {"tree": "gpt2", "what": "first call: clip_by_block_rms / x", "met": True},
        {"tree": "gpt2", "what": "first call: agc / optax.adaptive_grad_clip", "met": True},
        {"tree": "gpt2", "what": "first call: agc / optax.adaptive_grad_clip (chains)",
         "value": "1.75x", "met": False},
        {"tree": "gpt2", "what": "temp bytes: clip_by_leaf_norm chain / tree", "met": False}]
    # many2000: the global norm's own update cut off, so the table leaves that tree out
    many = {"trees": {"many1000": {"leaves": 1000}, "many2000": {"leaves": 2000},
                      "many5000": {"leaves": 5000}},
            "results": {"many1000": {gn: {"first_call_s": 2.0}, "agc": {"first_call_s": 4.2},
                                     "clippy": {"first_call_s": 3.9}},
                        "many2000": {gn: {"timeout_s": 120.0}, "agc": {"first_call_s": 1.0}},
                        "many5000": {gn: {"first_call_s": 10.0},
                                     "agc": {"timeout_s": 120.0},
                                     "clippy": {"timeout_s": 120.0, "skipped": True},
                                     "adagc": {"error": "compile failed"}}}}
    out = readme_tables.tables({"meta": {"jax": "j", "optax": "o", "platform": "cpu",
                                         "argv": ["--many-trees", "", "--reps", "3"],
                                         "commit": "abc1234"},
                                "step": [res], "many": many, "targets": targets})
    step_t, temp_t, first_t, own_t, many_t, foot = out.split("\n\n")

    def row(table, label):
        (got,) = [ln for ln in table.splitlines() if ln.startswith(f"| {label}")]
        return got

    # 1.1 / 1.0 over 1.03; per round 1.1 and 3.3 / 1.0: median 2.2
    assert row(step_t, "`clip_by_global_norm` / a hand-fused") == (
        "| `clip_by_global_norm` / a hand-fused clip (1 reduction, 1 scalar multiply) | "
        "**1.10x** (2.20x) | <= 1.03 |")
    # 1.2 / 1.1 = 1.09 misses 1.05, 1.1 / 1.1 meets it; no per-round ratios for the cell, as
    # one of its pairs has none
    assert row(step_t, "`clip_by_block_rms`, `clip_by_leaf_norm`").endswith(
        "| **1.09x**, 1.00x | <= 1.05 |")
    assert row(step_t, "`optax.clip_by_global_norm`").endswith("| 1.82x (1.21x) |  |")
    assert row(step_t, "`agc` / adam").endswith("| **1.50x** (1.50x) | <= 1.35 |")
    assert row(step_t, "`clippy`").endswith("| n/a |  |")
    # temporaries: a range, bold where the bench judged one of its chains a miss
    assert row(temp_t, "global-norm family").endswith("| **0.10%-3.00%** |")
    assert row(temp_t, "`agc`").endswith("| 0.40% |")
    # first calls: a ratio; seconds over the chain (a miss bold); both, met by the general
    # rule though the "(chains)" target missed
    assert row(first_t, "`clip_by_global_norm`").endswith("| 1.25x |")
    assert row(first_t, "`clip_by_leaf_norm`, `adagc`").endswith("| **+3.0 s**, n/a, n/a |")
    assert row(first_t, "`clip_by_block_rms`").endswith("| n/a |")  # no Optax entry
    assert row(first_t, "`agc`").endswith("| 1.75x (+4.0 s) |")
    assert own_t == ("(`agc`'s own first-call target, <= 2x Optax's AGC chain: 1.75x on GPT-2 "
                     "(missed).)")
    # many leaves: over 2x bold, a cut-off and a skipped one
    assert row(many_t, "`clip_by_global_norm`") == "| `clip_by_global_norm` | 2.00 s | 10.00 s |"
    assert row(many_t, "`agc`") == "| `agc` | **2.10x** | cut off (120 s) |"
    assert row(many_t, "`clippy`") == "| `clippy` | 1.95x | not tried |"
    assert row(many_t, "`adagc`") == "| `adagc` | n/a | error |"
    assert many_t.splitlines()[0].endswith("| 1,000 leaves | 5,000 leaves |")
    assert step_t.startswith("| chain + adam, step time, XLA:CPU | GPT-2 | target |")
    assert foot == ("(optclip at abc1234, jax j, optax o, ? CPU cores, ?: "
                    "`python -m bench --many-trees '' --reps 3`.)")


def test_readme_tables_first_call_ratio_needs_no_global_norm():
    # a ratio to Optax's counterpart is shown when the global-norm chain's first call is
    # missing; the seconds over that chain are not
    from bench import readme_tables

    ent = {"skip_nonfinite": {"first_call_s": 3.0}, "optax.apply_if_finite": {"first_call_s": 2.0},
           "skip_on_spike": {"first_call_s": 4.0}}
    res = {"tree": "gpt2", "entries": ent, "group_step_s": {"all": {}}, "ratios": []}
    out = readme_tables.tables({"meta": {"jax": "j", "optax": "o"}, "step": [res],
                                "many": None, "targets": []})
    assert "| `skip_nonfinite` / `optax.apply_if_finite`; `skip_on_spike` over the global-norm " \
           "chain | 1.50x; n/a |" in out
