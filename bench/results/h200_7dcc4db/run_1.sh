#!/bin/bash
# Device call 1 at 7dcc4db: the full benchmark on both trees (A), and, side by side on the
# host's other cores, the many-leaves compile times (B, compile only: no GPU kernels run);
# then the GPU tests once A is done.
export PYTHONPATH=. PYTHONUNBUFFERED=1
{ nvidia-smi -L; nproc; python3 -c "import jax, optax; print(jax.__version__, optax.__version__, jax.devices())"; git log --oneline -1; git status --short; } > $OUT/env_1.txt 2>&1
cat $OUT/env_1.txt
( timeout 380 python3 -m bench --trees gpt2,resnet50 --many-trees '' --reps 10 --out $OUT/full > /dev/null 2> $OUT/full.err ) &
A=$!
( export XLA_PYTHON_CLIENT_PREALLOCATE=false; timeout 260 python3 -m bench --trees '' --many-trees many1000 --max-compile-s 40 > $OUT/many1000.out 2>&1;
  timeout 110 python3 -m bench --trees '' --many-trees many2000 --max-compile-s 50 \
    --clippers clip_by_global_norm,clip_by_leaf_norm,adagc,agc,clip_by_block_rms > $OUT/many2000.out 2>&1 ) &
B=$!
wait $A; echo "A rc=$?"
export JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_PREALLOCATE=false
echo "JAX_PLATFORMS=$JAX_PLATFORMS; default backend: $(python3 -c 'import jax; print(jax.default_backend())' 2>/dev/null)" > $OUT/gpu_tests.log
timeout 80 python3 -m pytest tests/test_edges.py tests/test_bench.py tests/test_stats.py -k "not quick_runs" -q -n 6 -p no:benchmark -p no:cacheprovider 2>&1 | grep -v "PytestBenchmarkWarning\|warner(" >> $OUT/gpu_tests.log
echo "--- tests/test_norms.py" >> $OUT/gpu_tests.log
timeout 90 python3 -m pytest tests/test_norms.py -q -n 6 -p no:benchmark -p no:cacheprovider 2>&1 | grep -v "PytestBenchmarkWarning\|warner(" >> $OUT/gpu_tests.log
tail -3 $OUT/gpu_tests.log
wait $B; echo "B done"
[ -s $OUT/full.err ] || rm -f $OUT/full.err
tail -n 4 $OUT/full/bench.log; tail -n 25 $OUT/many1000.out $OUT/many2000.out
