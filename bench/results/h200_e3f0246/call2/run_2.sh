#!/bin/bash
# Device call 2, at the commit in env_2.txt (autoclip's percentile without a loop): the full
# benchmark on both trees (A) and, on the host's other cores, the update alone of autoclip
# and the global norm on 1,000 small leaves (B, compile only); then, once A is done, the
# AGC floor on the GPU (bench.gn_probe).
export PYTHONPATH=. PYTHONUNBUFFERED=1
{ nvidia-smi -L; python3 -c "import jax, optax; print(jax.__version__, optax.__version__, jax.devices())"; git log --oneline -1; git status --short; } > $OUT/env_2.txt 2>&1
cat $OUT/env_2.txt
( timeout 330 python3 -m bench --trees gpt2,resnet50 --many-trees '' --reps 10 --out $OUT/full > /dev/null 2> $OUT/full.err ) &
A=$!
( export XLA_PYTHON_CLIENT_PREALLOCATE=false; timeout 200 python3 -m bench --trees '' --many-trees many1000 --max-compile-s 40 \
    --clippers clip_by_global_norm,autoclip,autoclip_h1000 > $OUT/many1000.out 2>&1 ) &
B=$!
wait $A; echo "A rc=$?"
timeout 100 python3 -m bench.gn_probe --trees gpt2,resnet50 --reps 10 --only adam,agc,agc_fused,optax_agc > $OUT/gn_probe_agc.log 2>&1
wait $B
[ -s $OUT/full.err ] || rm -f $OUT/full.err
tail -n 3 $OUT/full/bench.log; grep "autoclip\|fused_global_norm \|clip_by_global_norm " $OUT/full/results.md | head; tail -n 10 $OUT/gn_probe_agc.log; grep "first call" $OUT/many1000.out
