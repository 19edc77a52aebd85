#!/bin/bash
# Prepared for the next session lent a GPU; not run yet. Device call 1 of this stop
# (run_1.sh) found that on XLA:GPU the update of `agc` and `clippy` on 1,000 small leaves
# compiles about one distinct kernel per leaf (1,074 of 1,080 and 1,058 of 1,073; the global
# norm 47 of 1,032), where on XLA:CPU the gather of `norms.split_flat` lets leaves of one
# shape share theirs (104 and 86). On a GPU `split_flat` hands each leaf its part by a slice,
# whose offset is part of the kernel. This measures the gather there, against the slice:
# (A) each update's first call on 1,000 leaves, in a fresh process, 3 rounds; (B) beside it
# on the host's other cores, the chains' step times on GPT-2 and ResNet-50, 10 rounds.
#   bash bench/results/h200_floors/next_gpu.sh   (TREE= and STEP_TREES= for a dry run)
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
TREE=${TREE:-many1000}; STEP_TREES=${STEP_TREES:-gpt2,resnet50}; OUT=${OUT:-/tmp/next_gpu}
mkdir -p $OUT
{ nvidia-smi -L; nproc; python3 -c "import jax; print(jax.__version__, jax.devices())"; } > $OUT/env.txt 2>&1
( for r in 1 2 3; do
    timeout 120 python3 -m bench.split_probe compile --tree $TREE --clipper clip_by_global_norm
    for c in clip_by_leaf_norm agc clippy; do for s in slice gather; do
      timeout 120 python3 -m bench.split_probe compile --tree $TREE --clipper $c --split $s
    done; done
  done > $OUT/split_compile.log 2>&1 ) &
A=$!
( timeout 420 python3 -m bench.split_probe step --trees $STEP_TREES --clippers clip_by_leaf_norm,agc,clippy --reps 10 > $OUT/split_step.log 2>&1 ) &
B=$!
wait $A; echo "A rc=$?"; wait $B; echo "B rc=$?"
grep -v Warn $OUT/split_compile.log | sed 's/.*compile //' ; tail -n 20 $OUT/split_step.log
