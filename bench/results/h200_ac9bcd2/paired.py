"""The H200 runs' step ratios, as ratios of medians and as medians of each round's ratio.

Device call 1 (``full/``) ran before the bench printed paired ratios. It timed every chain
in one group ('all'), so each entry's ``step_times_s`` is that group's list, round by round,
and the bench's own ``paired_ratio`` applies to it. Call 2 (``gpt2_20/``) saved its groups'
times. Besides the bench's ratios, a few that the GPU table of docs/benchmarks.md
(README's until ff32fcc) cites.
Run: PYTHONPATH=. python bench/results/h200_ac9bcd2/paired.py
"""
import json
from pathlib import Path

from bench.run import group_ratio, paired_ratio

EXTRA = [("optax.clip", "adam"), ("fused_global_norm", "optax.clip"),
         ("clip_by_global_norm", "optax.clip"), ("clip_by_value", "clip_by_global_norm"),
         ("clip_by_value_clamping", "clip_by_global_norm"), ("clip_by_value", "fused_global_norm"),
         ("optax.clip_by_global_norm", "fused_global_norm"), ("optax.apply_if_finite", "adam"),
         ("clippy", "adam")]

here = Path(__file__).parent
for run in ("full", "gpt2_20"):
    for res in json.loads((here / run / "results.json").read_text())["step"]:
        if "group_times_s" not in res:
            assert list(res["groups"]) == ["all"], res["groups"]
            res["group_times_s"] = {"all": {k: e["step_times_s"]
                                            for k, e in res["entries"].items()}}
        print(f"{run}/: {res['tree']} ({res['reps']} rounds of {res['steps']} steps)")
        rows = [(r["num"], r["den"], r["bound"]) for r in res["ratios"] if "+" not in r["den"]]
        rows += [(a, b, None) for a, b in EXTRA if (a, b, None) not in rows]
        for num, den, bound in rows:
            rm, pr = group_ratio(res, num, den), paired_ratio(res, num, den)
            if rm is None:
                continue
            tgt = "" if bound is None else f"  target <= {bound}"
            print(f"  {num:>31} / {den:<27} {rm:.3f}x  paired {pr:.3f}x{tgt}")
