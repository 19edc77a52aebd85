#!/bin/bash
# Device call 1 at ac9bcd2: the full benchmark on both trees (A), and, side by side on the
# host's other cores, the many-leaves compile times on 1,000 leaves (B, compile only: no GPU
# kernels run); then, once A is done, the test files changed since the last GPU run
# (7dcc4db) on the GPU.
export PYTHONPATH=. PYTHONUNBUFFERED=1
{ nvidia-smi -L; nproc; python3 -c "import jax, optax; print(jax.__version__, optax.__version__, jax.devices())"; git log --oneline -1; git status --short; } > $OUT/env_1.txt 2>&1
cat $OUT/env_1.txt
( timeout 320 python3 -m bench --trees gpt2,resnet50 --many-trees '' --reps 10 --out $OUT/full > /dev/null 2> $OUT/full.err ) &
A=$!
( export XLA_PYTHON_CLIENT_PREALLOCATE=false; timeout 300 python3 -m bench --trees '' --many-trees many1000 --max-compile-s 40 > $OUT/many1000.out 2>&1 ) &
B=$!
wait $A; echo "A rc=$?"
export JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_PREALLOCATE=false
echo "JAX_PLATFORMS=$JAX_PLATFORMS; default backend: $(python3 -c 'import jax; print(jax.default_backend())' 2>/dev/null)" > $OUT/gpu_tests.log
timeout 170 python3 -m pytest tests/test_static.py tests/test_norms.py tests/test_guards.py tests/test_edges.py -q -n 8 -p no:benchmark -p no:cacheprovider 2>&1 | grep -v "PytestBenchmarkWarning\|warner(" >> $OUT/gpu_tests.log
tail -4 $OUT/gpu_tests.log
wait $B; echo "B done"
[ -s $OUT/full.err ] || rm -f $OUT/full.err
tail -n 4 $OUT/full/bench.log; tail -n 25 $OUT/many1000.out
