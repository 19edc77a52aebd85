"""A pytest plugin that logs every XLA compile of a test run, by test and by function.

    PYTHONPATH=bench python -m pytest -n 2 -p compile_log

Each test process writes ``/tmp/compile_log_<pid>.json``: per test, the number of compiles
and their seconds; per (test function, jitted function), the same. How the suite's time
was found to be compiles: bench/results/cpu_suite/README.md.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re

import pytest

_current: dict[str, str | None] = {"test": None}
per_test: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
per_fn: dict[tuple[str, str], list] = collections.defaultdict(lambda: [0, 0.0])


class _Handler(logging.Handler):
    def emit(self, rec: logging.LogRecord) -> None:
        m = re.search(r"compilation of (\S+) in ([\d.e-]+) sec", rec.getMessage())
        if m:
            secs, test = float(m.group(2)), _current["test"] or "?"
            for d, key in ((per_test, test), (per_fn, (test.split("[")[0], m.group(1)))):
                d[key][0] += 1
                d[key][1] += secs


def pytest_configure(config):
    import jax

    jax.config.update("jax_log_compiles", True)
    log = logging.getLogger("jax._src.dispatch")
    log.addHandler(_Handler())
    log.setLevel(logging.WARNING)
    log.propagate = False
    logging.getLogger("jax._src.interpreters.pxla").setLevel(logging.ERROR)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current["test"] = item.nodeid
    yield
    _current["test"] = None


def pytest_unconfigure(config):
    with open(f"/tmp/compile_log_{os.getpid()}.json", "w") as f:
        json.dump({"test": dict(per_test),
                   "fn": [[k[0], k[1], v[0], v[1]] for k, v in per_fn.items()]}, f)
