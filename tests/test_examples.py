"""The examples run as a user runs them."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(name, *args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


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
    r = run_example("rnn_exploding.py", "--quick", "--sweep", "--out", str(tmp_path),
                    timeout=600)
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
    for png in ("rnn_exploding.png", "rnn_sweep.png"):
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
