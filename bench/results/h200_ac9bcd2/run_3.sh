#!/bin/bash
# Device call 3: optclip at 7dcc4db (the last GPU run before this one) against optclip now, in
# one process: clip_by_global_norm and clip_by_value + adam, with adam, optax.clip and the
# hand-fused clip, GPT-2 then ResNet-50. ab/optclip_old was made by make_old.sh 7dcc4db.
export PYTHONPATH=.:bench/results/h200_ac9bcd2/ab PYTHONUNBUFFERED=1
nvidia-smi -L
timeout 100 python3 bench/results/h200_ac9bcd2/ab_old.py gpt2 30 2>&1 | tee $OUT/ab_old_gpt2.log
timeout 80 python3 bench/results/h200_ac9bcd2/ab_old.py resnet50 30 2>&1 | tee $OUT/ab_old_resnet50.log
