"""Side by side in one process: optclip as at an older commit against optclip now.

The older package is a copy named ``optclip_old`` (made by ``make_old.sh COMMIT``, its imports
renamed). Each chain + adam is compiled as ``python -m bench`` compiles it, and all are timed
in one interleaved group (params and state donated; on an accelerator 20 steps a turn), then
reported as ratios of medians and as medians of each round's ratio.
Run: bash bench/results/h200_ac9bcd2/make_old.sh 7dcc4db && PYTHONPATH=.:bench/results/\
     h200_ac9bcd2/ab python bench/results/h200_ac9bcd2/ab_old.py [TREE] [REPS]
"""
import subprocess
import sys

import jax
import optax
import optclip_old

import optclip
from bench.clippers import entries
from bench.run import paired_ratio, time_chains

tree = sys.argv[1] if len(sys.argv) > 1 else "gpt2"
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 30
steps = 1 if jax.default_backend() == "cpu" else 20
head = subprocess.run(["git", "log", "--oneline", "-1"], capture_output=True, text=True).stdout
old = open(optclip_old.__file__.rsplit("/", 1)[0] + "/COMMIT").read().strip()
print(f"{jax.default_backend()} {jax.devices()[0].device_kind}; jax {jax.__version__}; "
      f"now: {head.strip()[:60]}; old: {old}")
adam = optax.adam(1e-3)
chains = {
    "adam": adam,
    "optax.clip": optax.chain(optax.clip(0.1), adam),
    "fused_global_norm": entries()["fused_global_norm"].chain(),
    "gn_old": optax.chain(optclip_old.clip_by_global_norm(1.0), adam),
    "gn_now": optax.chain(optclip.clip_by_global_norm(1.0), adam),
    "value_old": optax.chain(optclip_old.clip_by_value(0.1), adam),
    "value_now": optax.chain(optclip.clip_by_value(0.1), adam),
}
res = time_chains(chains, tree, reps, steps)
print(f"{tree}: {reps} rounds of {steps} steps; medians (ms): " + ", ".join(
    f"{k} {v * 1e3:.2f}" for k, v in res["group_step_s"]["all"].items()))
for num, den in [("gn_now", "gn_old"), ("gn_now", "fused_global_norm"),
                 ("gn_old", "fused_global_norm"), ("value_now", "value_old"),
                 ("value_now", "optax.clip"), ("value_old", "optax.clip"),
                 ("value_now", "gn_now"), ("fused_global_norm", "optax.clip"),
                 ("optax.clip", "adam")]:
    g = res["group_step_s"]["all"]
    print(f"  {num:>18} / {den:<18} {g[num] / g[den]:.3f}x  paired "
          f"{paired_ratio(res, num, den):.3f}x")
