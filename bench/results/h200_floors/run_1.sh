#!/bin/bash
# Device call 1: first calls of optclip's chains against hand-fused references (no stats, no
# NaN handling, no overflow safety; bench/clippers.py), each in a fresh process, on XLA:GPU.
# Three probes run side by side on the host's 16 cores (compiling only: no kernel runs),
# each with its rounds interleaved: chains + adam on GPT-2 (A) and on ResNet-50 (B), and the
# update alone on 1,000 small leaves (C).
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{ nvidia-smi -L; nproc; python3 -c "import jax, optax; print(jax.__version__, optax.__version__, jax.devices())"; } > $OUT/env_1.txt 2>&1
cat $OUT/env_1.txt
CH=clip_by_global_norm,fused_leaf_norm,clip_by_block_rms,adagc,fused_value,clip_by_value,fused_clippy,clippy
( timeout 450 python3 -m bench.compile_probe --trees gpt2 --clippers $CH --reps 3 > $OUT/gpt2.log 2>&1 ) &
A=$!
( timeout 450 python3 -m bench.compile_probe --trees resnet50 --clippers $CH --reps 3 --seed 1 > $OUT/resnet50.log 2>&1 ) &
B=$!
( timeout 450 python3 -m bench.compile_probe --trees many1000 --alone --clippers clip_by_global_norm,fused_global_norm,agc,stacked_agc,clippy,stacked_clippy --reps 3 --seed 2 > $OUT/many1000.log 2>&1 ) &
C=$!
wait $A; echo "A rc=$?"; wait $B; echo "B rc=$?"; wait $C; echo "C rc=$?"
for f in gpt2 resnet50 many1000; do tail -n 12 $OUT/$f.log; done
