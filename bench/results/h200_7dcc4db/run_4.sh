#!/bin/bash
# Device call 4, at dceb801 (eager updates run compiled): the edge tests on the GPU (the new
# eager tests, error_if_nonfinite's exception types among them) and the eager probe there.
export PYTHONPATH=. PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_PREALLOCATE=false
{ nvidia-smi -L; git log --oneline -1; echo "default backend: $(python3 -c 'import jax; print(jax.default_backend())' 2>/dev/null)"; } > $OUT/gpu_tests_4.log 2>&1
timeout 150 python3 -m pytest tests/test_edges.py -q -n 6 -p no:benchmark -p no:cacheprovider 2>&1 | grep -v "PytestBenchmarkWarning\|warner(" >> $OUT/gpu_tests_4.log
tail -3 $OUT/gpu_tests_4.log
timeout 100 python3 -m bench.eager_probe 2>/dev/null | tee $OUT/eager_probe_gpu.log
