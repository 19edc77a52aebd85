#!/usr/bin/env bash
# The donated steps of `python -m bench.gn_probe`, run in fresh processes, alternately with
# glibc's defaults and with GLIBC_TUNABLES that keep freed memory in the process (one malloc
# arena, no mmap for large blocks, no trimming): see README.md here.
#   bash bench/results/cpu_malloc/alternate.sh ROUNDS > bench/results/cpu_malloc/alternate.log
set -u
ROUNDS=${1:-2}
ONLY=${ONLY:-adam,fused,gn,agc,value,optax_clip,clippy,clippy_fused,skip_nonfinite,apply_if_finite}
TUNED=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776
echo "# $(date -u +%F), $(git rev-parse --short HEAD), nproc $(nproc), $(ldd --version | head -1)"
echo "# tuned: GLIBC_TUNABLES=$TUNED"
for r in $(seq 1 "$ROUNDS"); do
  for mode in plain tuned; do
    if [ "$mode" = tuned ]; then export GLIBC_TUNABLES=$TUNED; else unset GLIBC_TUNABLES; fi
    PYTHONPATH=. python -m bench.gn_probe --only "$ONLY" --reps "${REPS:-7}" 2>&1 \
      | grep " ms " | sed "s/^/round $r $mode: /"
  done
done
