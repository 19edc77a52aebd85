#!/bin/bash
# Copies optclip as at commit $1 to DIR/optclip_old (DIR: $2, by default
# bench/results/h200_ac9bcd2/ab), its own imports renamed, for ab_old.py and
# bench/results/cpu_full_gather/ab_step.py.
set -e
d=${2:-bench/results/h200_ac9bcd2/ab}/optclip_old
rm -rf "$d"; mkdir -p "$d"
git archive "$1" optclip | tar -x -C "$d" --strip-components=1
sed -i -E 's/^(\s*)(from|import) optclip(\b|\.)/\1\2 optclip_old\3/' "$d"/*.py
git rev-parse --short "$1" > "$d/COMMIT"
grep -c "optclip_old" "$d"/*.py | tr '\n' ' '; echo
