"""Test configuration: 8 simulated CPU devices and a shared hypothesis profile.

XLA_FLAGS must be set before JAX is imported anywhere, so it is set here, at
the top of the first module pytest imports.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hypothesis  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

hypothesis.settings.register_profile(
    "optclip", max_examples=30, deadline=None, derandomize=True, print_blob=True
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "optclip"))

# Compile time is most of the suite's time, and many tests build the same clipper on the same
# tree: each builds its own transformation, so JAX's in-memory cache (keyed by the function)
# misses, and XLA compiled the same program again. JAX's persistent cache is keyed by the
# program itself. It lives for this process only, in a directory of its own (no entry is
# read while another process writes it); OPTCLIP_TEST_NO_CACHE=1 turns it off.
if os.environ.get("OPTCLIP_TEST_NO_CACHE") != "1":
    _cache = tempfile.mkdtemp(prefix="optclip-test-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# With -n and no --dist, xdist schedules with "worksteal", not its default "load": a worker
# that runs out of tests takes some of the other's, so the run does not end on one worker's
# tail (17-20 s outside the tests against 40 s with "load" on 2 cores, about 20 s saved, less
# than the machine's spread: bench/results/cpu_suite/scheduling.md). Needs xdist >= 3.2.1.
# Set here rather than in pyproject's addopts, where `--dist` would be an unknown option
# under `-p no:xdist`.
@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    if getattr(config.option, "numprocesses", None) and config.option.dist == "no":
        config.option.dist = "worksteal"
