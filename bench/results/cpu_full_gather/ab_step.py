"""Side by side in one process: the per-unit chains + adam with optclip as at an older
commit (each small leaf's factors gathered at the units' shape, then a kernel to scale it)
against optclip now (gathered at the leaf's own shape, fused into the scaling), and the
global-norm chain and adam alone as yardsticks. Each chain is compiled as ``python -m
bench`` compiles it (params and state donated) and all are timed in one interleaved group,
reported as ratios of medians and as medians of each round's ratio.

Run: bash bench/results/h200_ac9bcd2/make_old.sh 34aef38 bench/results/cpu_full_gather/ab && \\
     PYTHONPATH=.:bench/results/cpu_full_gather/ab \\
     python bench/results/cpu_full_gather/ab_step.py [TREE] [REPS] [NAMES]
(NAMES: a comma list of leaf,agc,adagc,clippy; default all four.)
"""
import subprocess
import sys

import jax
import optax
import optclip_old

import optclip
from bench.run import paired_ratio, time_chains

tree = sys.argv[1] if len(sys.argv) > 1 else "resnet50"
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 15
head = subprocess.run(["git", "log", "--oneline", "-1"], capture_output=True, text=True).stdout
old = open(optclip_old.__file__.rsplit("/", 1)[0] + "/COMMIT").read().strip()
print(f"{jax.default_backend()} {jax.devices()[0].device_kind}; jax {jax.__version__}; "
      f"now: {head.strip()[:60]} (+ working tree); old: {old}")
adam = optax.adam(1e-3)
chains = {"adam": adam, "gn": optax.chain(optclip.clip_by_global_norm(1.0), adam)}
names = (sys.argv[3] if len(sys.argv) > 3 else "leaf,agc,adagc,clippy").split(",")
makers = {"leaf": lambda m: m.clip_by_leaf_norm(1.0), "agc": lambda m: m.agc(0.01),
          "adagc": lambda m: m.adagc(), "clippy": lambda m: m.clippy(0.1, 1e-7)}
for name, make in ((n, makers[n]) for n in names):
    for tag, mod in (("old", optclip_old), ("now", optclip)):
        chains[f"{name}_{tag}"] = (optax.chain(adam, make(mod)) if name == "clippy"
                                   else optax.chain(make(mod), adam))
res = time_chains(chains, tree, reps)
print(f"{tree}: {reps} rounds; medians (ms): " + ", ".join(
    f"{k} {v * 1e3:.2f}" for k, v in res["group_step_s"]["all"].items()))
g = res["group_step_s"]["all"]
for name in names:
    for num, den in ((f"{name}_now", f"{name}_old"), (f"{name}_now", "gn"),
                     (f"{name}_old", "gn")):
        print(f"  {num:>10} / {den:<10} {g[num] / g[den]:.3f}x  paired "
              f"{paired_ratio(res, num, den):.3f}x")
