#!/bin/bash
# Device call 3, at 7dcc4db's library with bench/xla_probe.py's unit_rescue mode: which forms of
# the overflow rescue's per-unit rescaled sum XLA:GPU fuses into its reduction, alone and in the
# agc chain + adam (temp bytes; compile only).
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi -L
timeout 300 python3 -m bench.xla_probe unit_rescue 2>&1 | grep -v Warning | tee $OUT/xla_probe_unit_rescue.log
