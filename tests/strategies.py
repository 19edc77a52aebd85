"""Hypothesis strategies for random pytrees of gradients."""

from __future__ import annotations

import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
from hypothesis.extra import numpy as hnp

DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}
# The largest decimal exponent that keeps values finite in each dtype.
MAX_EXP = {"float32": 30, "float16": 3, "bfloat16": 30}


@st.composite
def arrays(draw, dtype_name="float32", min_side=1):
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=min_side, max_side=4))
    # Elements are 0 or at least 1e-3 in magnitude before the power of ten, so that
    # no value is subnormal: XLA on CPU flushes subnormals to zero.
    elements = st.just(0.0) | st.floats(1e-3, 10.0) | st.floats(-10.0, -1e-3)
    base = draw(hnp.arrays(np.float64, shape, elements=elements))
    exp = draw(st.integers(-MAX_EXP[dtype_name], MAX_EXP[dtype_name]))
    return jnp.asarray(base * 10.0**exp, DTYPES[dtype_name])


@st.composite
def trees(draw, dtypes=("float32",), min_leaves=1, max_leaves=4):
    n = draw(st.integers(min_leaves, max_leaves))
    leaves = [draw(arrays(draw(st.sampled_from(dtypes)))) for _ in range(n)]
    return {f"p{i}": x for i, x in enumerate(leaves)}


ords = st.sampled_from([1.0, 2.0, 3.0, 2.5, float("inf")])
