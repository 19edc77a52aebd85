#!/bin/bash
# Device call 2 at ac9bcd2 + the bench's paired ratios: GPT-2 alone, every clipper, 20 rounds,
# since call 1's GPT-2 rounds drifted (rounds 4-7 of 10 slow for every chain).
export PYTHONPATH=. PYTHONUNBUFFERED=1
{ nvidia-smi -L; git log --oneline -1; git status --short; } > $OUT/env_2.txt 2>&1
cat $OUT/env_2.txt
timeout 290 python3 -m bench --trees gpt2 --many-trees '' --reps 20 --out $OUT/gpt2_20 > /dev/null 2> $OUT/gpt2_20.err
echo "rc=$?"
[ -s $OUT/gpt2_20.err ] || rm -f $OUT/gpt2_20.err
grep "step:" $OUT/gpt2_20/results.md; tail -n 3 $OUT/gpt2_20/bench.log
