#!/bin/bash
# Prepared for the next session lent a GPU; not run yet. Device call 1 of this stop
# (run_1.sh) found that on XLA:GPU the update of `agc` and `clippy` on 1,000 small leaves
# compiles about one distinct kernel per leaf (1,074 of 1,080 and 1,058 of 1,073; the global
# norm 47 of 1,032), where on XLA:CPU the gather of `norms.split_flat` lets leaves of one
# shape share theirs (104 and 86). On a GPU `split_flat` hands each leaf its part by a
# slice, whose offset is part of the kernel. (The stacked references, with 47 and 50
# distinct kernels, compiled slower still there: kernel counts alone may not decide.) This
# measures the gather there, against the slice: (A) each update's first call on 1,000
# leaves, in a fresh process after a warm-up compile, 2 rounds, the order of slice and
# gather swapped in the second; (B) beside it on the host's other cores (so A's compiles
# share the host with B's timing: compare B's ratios within B only), the chains' step
# times on GPT-2, 8 rounds. Both within 430 s.
#   bash bench/results/h200_floors/next_gpu.sh
#   TREE=tiny_many STEP_TREES=small OUT=/tmp/next_gpu bash bench/results/h200_floors/next_gpu.sh  # dry run
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
TREE=${TREE:-many1000}; STEP_TREES=${STEP_TREES:-gpt2}; OUT=${OUT:-/tmp/next_gpu}
mkdir -p $OUT
{ nvidia-smi -L; nproc; python3 -c "import jax; print(jax.__version__, jax.devices())"; } > $OUT/env.txt 2>&1
one() { timeout 100 python3 -m bench.split_probe compile --tree $TREE --clipper $1 --split $2; }
( timeout 430 bash -c "$(declare -f one); TREE=$TREE
  one clip_by_global_norm default
  for c in agc clippy; do one \$c slice; one \$c gather; done
  one clip_by_global_norm default
  for c in clippy agc; do one \$c gather; one \$c slice; done" > $OUT/split_compile.log 2>&1 ) &
A=$!
( timeout 430 python3 -m bench.split_probe step --trees $STEP_TREES --clippers agc,clippy --reps 8 > $OUT/split_step.log 2>&1 ) &
B=$!
wait $A; echo "A rc=$?"; wait $B; echo "B rc=$?"
grep "^compile" $OUT/split_compile.log; tail -n 12 $OUT/split_step.log
