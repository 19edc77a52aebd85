"""The examples run as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


# XLA's lowest backend optimisation level: half the compile time of a demo's many small
# programs (the RNN demo's --quick run, 44 s -> 22 s on 2 cores). For the smoke tests, which
# check the files a run writes and not its numbers.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def run_example(name, *args, timeout=300, fast_compile=False):
    # this checkout's optclip, not whichever one is installed
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OPTCLIP_NO_BAR": "1"}
    if fast_compile:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def test_quickstart_runs_and_prints_stats():
    r = run_example("quickstart.py")
    assert r.returncode == 0, r.stderr
    assert "grad_norm" in r.stdout and "clipped on" in r.stdout
    clipped = int(r.stdout.split("clipped on ")[1].split()[0])
    assert 0 < clipped < 200  # the clip engaged at the start, then let go


def test_sharded_training_matches_one_device():
    r = run_example("sharded_training.py")
    assert r.returncode == 0, r.stderr
    assert "8 devices" in r.stdout
    assert "match the one-device run: True" in r.stdout


def test_rnn_demo_quick_writes_schema_and_figures(tmp_path):
    # two sweep methods (of the default four): the sweep's code and figure, at half the compiles
    r = run_example("rnn_exploding.py", "--quick", "--sweep", "--sweep-methods",
                    "none,global_norm", "--out", str(tmp_path), timeout=600,
                    fast_compile=True)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"config", "runs", "sweep"} <= set(summary)
    methods = summary["config"]["methods"]
    assert methods == ["none", "global_norm", "value", "leaf_norm", "agc", "autoclip", "zclip",
                       "adagc"]
    assert len(summary["runs"]) == len(methods) * summary["config"]["seeds"]
    for run in summary["runs"]:
        assert set(run) >= {"method", "seed", "diverged", "steps_to_divergence", "final_loss",
                            "max_grad_norm"}
        assert isinstance(run["diverged"], bool)
        assert (run["steps_to_divergence"] is None) == (not run["diverged"])
    for png in ("rnn_exploding.png", "rnn_details.png", "rnn_sweep.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert "final MSE" in r.stdout


def test_rnn_demo_shows_the_effect(tmp_path):
    # The real configuration (T=50, 64 units, lr 0.1), short: unclipped SGD blows up within
    # a few dozen steps on every seed; with clip_by_global_norm(1.0) no seed does.
    sys.path.insert(0, str(ROOT / "examples"))
    import rnn_exploding

    summary = rnn_exploding.main(["--steps", "60", "--seeds", "3", "--methods",
                                  "none,global_norm", "--out", str(tmp_path)])
    runs = summary["runs"]
    none = [r for r in runs if r["method"] == "none"]
    clipped = [r for r in runs if r["method"] == "global_norm"]
    assert all(r["diverged"] for r in none)
    assert not any(r["diverged"] for r in clipped)
    assert all(r["max_grad_norm"] < 1e3 for r in clipped)


def test_gradient_field(tmp_path):
    r = run_example("gradient_field.py", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "gradient_field.png").stat().st_size > 20_000
    # with clipping no step is longer than lr * max_norm; without, the cliff throws SGD far
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("longest")][0]
    raw, clipped = [float(w.rstrip(";")) for w in line.replace(":", " ").split()
                    if w.replace(".", "").rstrip(";").isdigit()][:2]
    assert clipped <= 0.1 + 1e-6 and raw > 1.0


def _synthetic_history(stops, steps=200, seed=0):
    """A method's history whose seeds diverge at ``stops``; after that its records are junk."""
    rng = np.random.default_rng(seed)
    n = len(stops)
    loss = np.full((n, steps), 0.2) + 0.01 * rng.random((n, steps))
    for i, s in enumerate(stops):
        if s is not None:
            loss[i, s:] = np.nan  # what a diverged run records
    return {"loss": loss,
            "grad_norm": np.exp(rng.normal(size=(n, steps))),
            # a diverged run's clip flags keep arriving (NaN comparisons, garbage norms)
            "clipped": rng.random((n, steps)) < 0.3,
            "layers": {"rnn.cell.dense_h.kernel": np.exp(rng.normal(size=(n, steps)))}}


def test_all_diverged_method_contributes_nothing_after_divergence():
    # The old figure averaged a diverged seed's clip flags into the clip-fraction panel:
    # zclip showed 8-16% clipping at steps 50-100 although every seed had diverged by step 4.
    from optclip.plotting import aggregate_history, plot_training, plot_training_details

    stops = [2, 3, 4]
    h = _synthetic_history(stops)
    a = aggregate_history(h, stops, window=50, smooth=5)
    after = slice(max(stops) + 1, None)
    assert np.all(a["running"][after] == 0)
    for key in ("loss_median", "grad_norm_median", "clip_fraction"):
        assert np.isfinite(a[key][: min(stops) + 1]).any(), key  # drawn before divergence
        assert not np.isfinite(a[key][after]).any(), key  # and nothing after
    assert not np.isfinite(a["loss"][:, after]).any()
    assert not np.isfinite(a["layers"]["rnn.cell.dense_h.kernel"][after]).any()

    # a partly diverged method: the fraction is over the seeds still running
    stops2 = [None, 10, None]
    h2 = _synthetic_history(stops2, seed=1)
    b = aggregate_history(h2, stops2, window=1)
    alive = h2["clipped"][[0, 2], 20:].mean(axis=0)
    np.testing.assert_allclose(b["clip_fraction"][20:], alive)

    # and in the figures: no line of the diverged method holds a point after its divergence
    history = {"global_norm": _synthetic_history([None] * 3, seed=2), "zclip": h}
    at = {"global_norm": [None] * 3, "zclip": stops}
    import matplotlib.pyplot as plt

    for fig in (plot_training(history, diverged_at=at, smooth=5),
                plot_training_details(history, diverged_at=at, smooth=5)):
        lines = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid() == "zclip"]
        assert lines
        for ln in lines:
            x, y = (np.asarray(v, np.float64) for v in ln.get_data())
            assert not np.isfinite(y[x > max(stops) + 1]).any()  # x is step + 1
        plt.close(fig)


def test_lm_demo_quick_writes_schema_and_figure(tmp_path):
    # no clipper, and a guard around a clipper (each method and scenario is a compile of its
    # own; the headline tests below run global_norm and zclip at the default sizes)
    methods = ["none", "zclip+skip_nonfinite"]
    r = run_example("lm_spikes.py", "--quick", "--methods", ",".join(methods), "--out",
                    str(tmp_path), timeout=600, fast_compile=True)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    cfg = summary["config"]
    assert cfg["methods"] == methods
    assert cfg["scenarios"] == ["base", "drift"]
    assert {"spike_rule", "divergence_rule", "data", "clippers"} <= set(cfg)
    assert len(summary["runs"]) == 2 * len(cfg["methods"]) * cfg["seeds"]
    for run in summary["runs"]:
        assert set(run) >= {"scenario", "method", "seed", "spikes", "spike_steps", "diverged",
                            "final_train_loss", "heldout_loss", "acted_fraction"}
        assert run["spikes"] == len(run["spike_steps"])
        assert isinstance(run["diverged"], bool)
        assert 0.0 <= run["acted_fraction"] <= 1.0
        assert run["method"] != "none" or run["acted_fraction"] == 0.0
    data = (tmp_path / "lm_spikes.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    # the README table comes from the summary by a command
    t = run_example("lm_spikes.py", "--table", str(tmp_path / "summary.json"))
    assert t.returncode == 0, t.stderr
    rows = [ln for ln in t.stdout.splitlines() if ln.startswith("| ")]
    assert len(rows) == 1 + 2 * len(cfg["methods"])  # the header, then a row per run group


def test_lm_spike_rule():
    sys.path.insert(0, str(ROOT / "examples"))
    import lm_spikes

    loss = np.full(200, 2.0)
    glitch = np.zeros(200, bool)
    loss[100], loss[101], loss[150] = 3.5, 3.2, 3.1  # two spikes (100-101 is one)
    loss[120], glitch[120] = 9.0, True  # a glitch step's own loss is not a spike
    assert lm_spikes.spike_steps(loss, glitch) == [100, 150]
    assert lm_spikes.spike_steps(np.full(200, 2.0), glitch) == []


@pytest.mark.parametrize("scenario", ["base", "drift"])
def test_lm_demo_headline(tmp_path, scenario):
    # The default configuration, seed 0. base: junk batches at a high lr give loss spikes
    # without clipping and none with clip_by_global_norm(1.0), whose held-out loss is far
    # better. drift: with the gradient norm drifting 1e4x, the fixed threshold misses an
    # early junk batch (a spike in the first half, where 1.0 is above the norm); zclip,
    # adaptive, has no spike and a better held-out loss.
    sys.path.insert(0, str(ROOT / "examples"))
    import lm_spikes

    a, b = ("none", "global_norm") if scenario == "base" else ("global_norm", "zclip")
    summary = lm_spikes.main(["--seeds", "1", "--methods", f"{a},{b}", "--scenarios", scenario,
                              "--out", str(tmp_path)])
    worse, better = (next(r for r in summary["runs"] if r["method"] == m) for m in (a, b))
    assert not worse["diverged"] and not better["diverged"]
    assert worse["spikes"] >= 1 and better["spikes"] == 0
    assert worse["heldout_loss"] > better["heldout_loss"] + (0.5 if scenario == "base" else 0.1)
    if scenario == "drift":
        assert worse["spike_steps"][0] < 300
