#!/bin/bash
# Prepared for the next session lent a GPU; not run yet. Device call 1 of this stop
# (run_1.sh) found that on XLA:GPU the update of `agc` and `clippy` on 1,000 small leaves
# compiles about one distinct kernel per leaf (1,074 of 1,080 and 1,058 of 1,073; the global
# norm 47 of 1,032), where on XLA:CPU the gather of `norms.split_flat` lets leaves of one
# shape share theirs (104 and 86). On a GPU `split_flat` hands each leaf its part by a
# slice; that its offset makes each kernel distinct fits the counts, but the GPU's program
# was not read, and the stacked references, with 47 and 50 distinct kernels, compiled
# slower still there: kernel counts alone may not decide. This measures, one after the
# other (nothing else on the host while B times):
# (A) each update's first call on 1,000 leaves, in a fresh process after a warm-up
#     compile, by slice, by the gather alone (gather_plain) and by the gather as shipped
#     on XLA:CPU (gather: from the vector written out by a lax.cond, which on a GPU may
#     also cost a host sync per step), 2 rounds, the order reversed in the second;
# (B) the chains' step times on GPT-2 with each split, 5 rounds.
# At most 260 s + 120 s; each compile at most 60 s (--foreground: killed with A).
#   bash bench/results/h200_floors/next_gpu.sh
#   TREE=tiny_many STEP_TREES=small OUT=/tmp/next_gpu bash bench/results/h200_floors/next_gpu.sh  # dry run
export PYTHONPATH=. PYTHONUNBUFFERED=1
TREE=${TREE:-many1000}; STEP_TREES=${STEP_TREES:-gpt2}; OUT=${OUT:-/tmp/next_gpu}
mkdir -p $OUT
{ nvidia-smi -L; nproc; python3 -c "import jax; print(jax.__version__, jax.devices())"; } > $OUT/env.txt 2>&1
one() { timeout --foreground 60 python3 -m bench.split_probe compile --tree $TREE --clipper $1 --split $2; }
timeout 260 bash -c "$(declare -f one); TREE=$TREE
  one clip_by_global_norm default
  for c in agc clippy; do for s in slice gather_plain gather; do one \$c \$s; done; done
  one clip_by_global_norm default
  for c in clippy agc; do for s in gather gather_plain slice; do one \$c \$s; done; done" > $OUT/split_compile.log 2>&1
echo "A rc=$?"
timeout 120 python3 -m bench.split_probe step --trees $STEP_TREES --clippers agc,clippy --splits slice,gather_plain,gather --reps 5 > $OUT/split_step.log 2>&1
echo "B rc=$?"
grep "^compile" $OUT/split_compile.log; tail -n 12 $OUT/split_step.log
