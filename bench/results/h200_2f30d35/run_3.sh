#!/bin/bash
# Device call 3: no constant outputs (stats) and the pair barrier; GPU tests.
export PYTHONPATH=. PYTHONUNBUFFERED=1
{ nvidia-smi -L; python3 -c "import jax, optax; print(jax.__version__, optax.__version__, jax.devices())"; git log --oneline -1; git status --short; } > $OUT/env_3.txt 2>&1
cat $OUT/env_3.txt
timeout 170 python3 -m bench.gn_probe --trees gpt2,resnet50 --reps 10 \
  --only adam,fused,gn,gn_traced,adam_constout,zclip_capped,leaf,agc,value,optax_clip 2>&1 | tee $OUT/gn_probe_3.log
export JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_PREALLOCATE=false
echo "JAX_PLATFORMS=$JAX_PLATFORMS XLA_PYTHON_CLIENT_PREALLOCATE=$XLA_PYTHON_CLIENT_PREALLOCATE; default backend: $(python3 -c 'import jax; print(jax.default_backend())' 2>/dev/null)" | tee $OUT/gpu_tests_3.log
timeout 100 python3 -m pytest tests/test_edges.py tests/test_bench.py tests/test_stats.py -k "not quick_runs" -q -n 4 -p no:benchmark 2>&1 | grep -v "PytestBenchmarkWarning\|warner(" | tee -a $OUT/gpu_tests_3.log
