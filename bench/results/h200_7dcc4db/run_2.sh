#!/bin/bash
# Device call 2 at 7dcc4db: the optimized GPU HLO and buffer assignment of the chains whose GPU
# step or temporary misses its target (bench.dump_step), packed into one archive.
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi -L
for c in "agc resnet50" "agc gpt2" "clip_by_value gpt2" "optax.clip gpt2" "clip_by_global_norm gpt2" "optax.adaptive_grad_clip resnet50"; do
  timeout 60 python3 -m bench.dump_step $c --out /tmp/dump 2>&1 | grep -v Warning
done | tee $OUT/dump_step.log
cd /tmp && tar czf $OUT/dumps.tgz dump && ls -la $OUT
