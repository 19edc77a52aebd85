#!/bin/bash
# Device call 5, at the second version of eager updates run compiled (from the second call):
# the edge and guard tests on the GPU, and the eager probe there.
export PYTHONPATH=. PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_PREALLOCATE=false
{ nvidia-smi -L; echo "default backend: $(python3 -c 'import jax; print(jax.default_backend())' 2>/dev/null)"; } > $OUT/gpu_tests_5.log 2>&1
timeout 150 python3 -m pytest tests/test_edges.py tests/test_guards.py -q -n 8 -p no:benchmark -p no:cacheprovider 2>&1 | grep -v "PytestBenchmarkWarning\|warner(" >> $OUT/gpu_tests_5.log
tail -3 $OUT/gpu_tests_5.log
timeout 60 python3 -m bench.eager_probe 2>/dev/null | tee $OUT/eager_probe_gpu_5.log
