#!/usr/bin/env bash
# bash bench/results/cpu_malloc/each_tunable.sh > bench/results/cpu_malloc/each_tunable.log
echo "# $(date -u +%F), optclip $(git rev-parse --short HEAD), $(ldd --version | head -1)"
for t in "" glibc.malloc.arena_max=1 glibc.malloc.mmap_max=0 \
    glibc.malloc.trim_threshold=1099511627776 \
    glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776; do
  if [ -n "$t" ]; then export GLIBC_TUNABLES=$t; else unset GLIBC_TUNABLES; fi
  PYTHONPATH=. python bench/results/cpu_malloc/each_tunable.py
done
