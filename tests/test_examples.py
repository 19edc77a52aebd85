"""The examples run as a user runs them."""

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
