"""Test configuration: 8 simulated CPU devices and a shared hypothesis profile.

XLA_FLAGS must be set before JAX is imported anywhere, so it is set here, at
the top of the first module pytest imports.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile(
    "optclip", max_examples=30, deadline=None, derandomize=True, print_blob=True
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "optclip"))
