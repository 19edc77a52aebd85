"""optclip: gradient clipping for JAX and Optax.

Every clipper is an ``optax.GradientTransformation``::

    tx = optax.chain(optclip.clip_by_global_norm(1.0), optax.adam(1e-3))
    optclip.stats(state)  # {"grad_norm", "threshold", "scale", "clipped"}
"""

from optclip.adaptive import (
    AdaGCState,
    AGCState,
    AutoClipState,
    ZClipState,
    adagc,
    agc,
    autoclip,
    zclip,
)
from optclip.clippy import ClippyState, clippy
from optclip.guards import SkipNonfiniteState, SkipOnSpikeState, skip_nonfinite, skip_on_spike
from optclip.norms import global_norm, leaf_norms, unitwise_norm
from optclip.static import (
    BlockRMSClipState,
    ClipState,
    GlobalNormClipState,
    LeafNormClipState,
    ValueClipState,
    clip_by_block_rms,
    clip_by_global_norm,
    clip_by_leaf_norm,
    clip_by_value,
)
from optclip.stats import ClipStats, GuardStats, SpikeStats, reset_peaks, stats, stats_records

__version__ = "0.1.0"

__all__ = [
    "AGCState",
    "AdaGCState",
    "AutoClipState",
    "SkipOnSpikeState",
    "ZClipState",
    "adagc",
    "agc",
    "autoclip",
    "skip_on_spike",
    "zclip",
    "BlockRMSClipState",
    "ClipState",
    "ClipStats",
    "ClippyState",
    "clippy",
    "GlobalNormClipState",
    "GuardStats",
    "SpikeStats",
    "LeafNormClipState",
    "SkipNonfiniteState",
    "ValueClipState",
    "__version__",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_leaf_norm",
    "clip_by_value",
    "global_norm",
    "leaf_norms",
    "skip_nonfinite",
    "stats",
    "stats_records",
    "reset_peaks",
    "unitwise_norm",
]
