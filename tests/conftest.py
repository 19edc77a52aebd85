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

hypothesis.settings.register_profile(
    "optclip", max_examples=30, deadline=None, derandomize=True, print_blob=True
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "optclip"))

# Compile time is most of the suite's time, and many tests build the same clipper on the same
# tree: each builds its own transformation, so JAX's in-memory cache (keyed by the function)
# misses, and XLA compiled the same program again. JAX's persistent cache is keyed by the
# program itself. One directory serves the whole run: the first process (pytest's controller,
# or a run without xdist) makes it, xdist's workers inherit it through the environment and
# share what each compiles, and it is removed when that first process exits. Entries are
# written atomically (see _put_atomically), so that no process reads one half written.
# OPTCLIP_TEST_NO_CACHE=1 turns the cache off.


def _put_atomically(self, key: str, value: bytes) -> None:
    """JAX's ``LRUCache.put`` without a size limit, written to a temporary file and renamed
    into place: JAX writes the entry in place, and a process sharing the directory could
    read it half written (JAX would then warn and compile again)."""
    path = self.path / f"{key}{_lru_cache._CACHE_SUFFIX}"
    if path.exists():
        return
    fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".partial-")
    with os.fdopen(fd, "wb") as f:
        f.write(value)
    os.replace(tmp, path)


if os.environ.get("OPTCLIP_TEST_NO_CACHE") != "1":
    _cache = os.environ.get("OPTCLIP_TEST_JAX_CACHE", "")
    if not os.path.isdir(_cache):
        _cache = tempfile.mkdtemp(prefix="optclip-test-jax-cache-")
        os.environ["OPTCLIP_TEST_JAX_CACHE"] = _cache
        atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    try:
        from jax._src import lru_cache as _lru_cache  # noqa: E402

        _shared = hasattr(_lru_cache.LRUCache, "put") and hasattr(_lru_cache, "_CACHE_SUFFIX")
    except ImportError:
        _shared = False
    if _shared:
        _lru_cache.LRUCache.put = _put_atomically
    elif os.environ.get("PYTEST_XDIST_WORKER"):
        # JAX's cache changed: a directory of this process's own
        _cache = tempfile.mkdtemp(prefix="optclip-test-jax-cache-")
        atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
