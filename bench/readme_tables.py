"""README's benchmark tables, from a ``python -m bench`` run's ``results.json``.

    python -m bench.readme_tables [bench/results/results.json]

Prints the tables of README's Benchmarks section that come from the bench's CPU run: step
time, temporaries, first calls, and the many-leaves compiles. README holds this command's
output on the committed ``results.json`` between its ``bench-tables`` markers, and
``tests/test_bench.py`` checks that it still does, so the README's figures cannot drift
from the run they cite.

A step ratio is the ratio of the two chains' median steps, timed in one interleaved group
(``bench.run.group_ratio``: what the targets are judged on); where the run recorded each
round's times, the median of each round's ratio (``bench.run.paired_ratio``) follows in
brackets. **Bold** marks a value that misses its target, as the bench's targets table
judges it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.run import MANY_COMPILE_RATIO, command_line, group_ratio, paired_ratio

TREES = (("gpt2", "GPT-2"), ("resnet50", "ResNet-50"))
GN = "clip_by_global_norm"
START = "<!-- bench-tables: python -m bench.readme_tables bench/results/results.json -->"
END = "<!-- /bench-tables -->"

# (row label, the (numerator, denominator) pairs of its cells, the target shown)
STEP_ROWS = [
    ("`clip_by_global_norm` / a hand-fused clip (1 reduction, 1 scalar multiply)",
     [(GN, "fused_global_norm")], "<= 1.03"),
    ("`optax.clip_by_global_norm` / global-norm chain",
     [("optax.clip_by_global_norm", GN)], ""),
    ("`clip_by_block_rms`, `clip_by_leaf_norm` / global-norm chain",
     [("clip_by_block_rms", GN), ("clip_by_leaf_norm", GN)], "<= 1.05"),
    ("`autoclip`, `autoclip(history=1000)` / global-norm chain",
     [("autoclip", GN), ("autoclip_h1000", GN)], "<= 1.05"),
    ("`zclip`, `adagc` / global-norm chain", [("zclip", GN), ("adagc", GN)], "<= 1.05"),
    ("`agc` / adam", [("agc", "adam")], "<= 1.35"),
    ("`optax.adaptive_grad_clip` / adam", [("optax.adaptive_grad_clip", "adam")], ""),
    ("`clip_by_value` / `optax.clip`, nothing clamped (as at 0.1 here)",
     [("clip_by_value", "optax.clip")], "<= 1.05"),
    ("`clip_by_value` / `optax.clip`, a third of the elements clamped (0.01)",
     [("clip_by_value_clamping", "optax.clip")], "<= 1.05"),
    ("`skip_nonfinite(adam)`, `skip_on_spike(adam)` / global-norm chain",
     [("skip_nonfinite", GN), ("skip_on_spike", GN)], "<= 1.05"),
    ("`skip_nonfinite(adam)` / `optax.apply_if_finite(adam)`",
     [("skip_nonfinite", "optax.apply_if_finite")], ""),
    ("`optax.apply_if_finite(adam)` / adam", [("optax.apply_if_finite", "adam")], ""),
    ("`clippy` after adam / global-norm chain", [("clippy", GN)], ""),
]

TEMP_ROWS = [
    ("global-norm family and per-leaf clippers",
     [GN, "clip_by_block_rms", "clip_by_leaf_norm", "autoclip", "autoclip_h1000", "zclip",
      "adagc"]),
    ("`clip_by_value` (nothing clamped, a third clamped)",
     ["clip_by_value", "clip_by_value_clamping"]),
    ("`agc`", ["agc"]),
    ("`skip_nonfinite`, `skip_on_spike`", ["skip_nonfinite", "skip_on_spike"]),
    ("`optax.apply_if_finite`", ["optax.apply_if_finite"]),
    ("`optax.clip_by_global_norm`", ["optax.clip_by_global_norm"]),
    ("`clippy` after adam", ["clippy"]),
]

# (row label, the separator between its cells, the cells: ("ratio", num, den), ("over", num):
# the seconds over the global-norm chain, or ("both", num, den): the ratio, then those seconds)
FIRST_ROWS = [
    ("`clip_by_global_norm` / `optax.clip_by_global_norm`", "",
     [("ratio", GN, "optax.clip_by_global_norm")]),
    ("`zclip`, `autoclip`, `autoclip(history=1000)`: over the global-norm chain", ", ",
     [("over", "zclip"), ("over", "autoclip"), ("over", "autoclip_h1000")]),
    ("`skip_nonfinite` / `optax.apply_if_finite`; `skip_on_spike` over the global-norm chain",
     "; ", [("ratio", "skip_nonfinite", "optax.apply_if_finite"), ("over", "skip_on_spike")]),
    ("`clip_by_value` / `optax.clip`, nothing clamped; a third clamped", "; ",
     [("both", "clip_by_value", "optax.clip"),
      ("both", "clip_by_value_clamping", "optax.clip")]),
    ("`clip_by_block_rms` / `optax.clip_by_block_rms`", "",
     [("both", "clip_by_block_rms", "optax.clip_by_block_rms")]),
    ("`clip_by_leaf_norm`, `adagc`, `clippy`: over the global-norm chain", ", ",
     [("over", "clip_by_leaf_norm"), ("over", "adagc"), ("over", "clippy")]),
    ("`agc` / `optax.adaptive_grad_clip`", "", [("both", "agc", "optax.adaptive_grad_clip")]),
]

MANY_ROWS = ["clip_by_value", "clip_by_block_rms", "clip_by_leaf_norm", "agc", "autoclip",
             "autoclip_h1000", "zclip", "adagc", "skip_nonfinite", "skip_on_spike", "clippy"]


def _bold(text: str, miss: bool) -> str:
    return f"**{text}**" if miss else text


def _bound(res: dict, num: str, den: str) -> float | None:
    for r in res["ratios"]:
        if r["num"] == num and r["den"] == den:
            return r["bound"]
    return None


def _step_cell(res: dict, pairs: list[tuple[str, str]]) -> str:
    ratios, paired = [], []
    for num, den in pairs:
        v = group_ratio(res, num, den)
        if v is None:
            return "n/a"
        b = _bound(res, num, den)
        ratios.append(_bold(f"{v:.2f}x", b is not None and v > b))
        p = paired_ratio(res, num, den)
        if p is not None:
            paired.append(f"{p:.2f}x")
    cell = ", ".join(ratios)
    return f"{cell} ({', '.join(paired)})" if len(paired) == len(ratios) else cell


def _miss(targets: list[dict], tree: str, prefix: str) -> bool:
    """Whether the bench judged a measurement on ``tree`` whose name starts with ``prefix``
    a miss (a first call's ``(chains)`` row, an issue's own target for ``agc``, is apart)."""
    return any(t["tree"] == tree and t["what"].startswith(prefix) and t["met"] is False
               and not t["what"].endswith("(chains)") for t in targets)


def _seconds(x: float) -> str:
    s = f"{x:+.1f}"
    return f"{'+0.0' if s == '-0.0' else s} s"


def _first_cell(res: dict, targets: list[dict], sep: str, cells: list[tuple]) -> str:
    ent, tree = res["entries"], res["tree"]
    fc = {k: v["first_call_s"] for k, v in ent.items() if "first_call_s" in v}
    out = []
    for kind, num, *den in cells:
        if num not in fc or (den and den[0] not in fc) or (kind != "ratio" and GN not in fc):
            out.append("n/a")
            continue
        over = _seconds(fc[num] - fc[GN]) if GN in fc else ""
        miss = _miss(targets, tree, f"first call: {num} /")
        if kind == "over":
            out.append(_bold(over, miss))
        elif kind == "ratio":
            out.append(_bold(f"{fc[num] / fc[den[0]]:.2f}x", miss))
        else:
            out.append(f"{_bold(f'{fc[num] / fc[den[0]]:.2f}x', miss)} ({over})")
    return sep.join(out)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%" if x < 0.1 else f"{100 * x:.0f}%"


def _temp_cell(res: dict, targets: list[dict], names: list[str]) -> str:
    fr = [res["entries"][n]["temp_fraction"] for n in names
          if n in res["entries"] and res["entries"][n].get("temp_fraction") is not None]
    if not fr:
        return "n/a"
    lo, hi = min(fr), max(fr)
    miss = any(_miss(targets, res["tree"], f"temp bytes: {n} chain") for n in names)
    return _bold(_pct(lo) if _pct(lo) == _pct(hi) else f"{_pct(lo)}-{_pct(hi)}", miss)


def _many_cell(per: dict, name: str) -> str:
    """One update's first call over the global norm's on one tree, as ``bench.run``'s
    markdown reads its entry (cut off, not tried after a cut-off, an error, or absent)."""
    r, gn = per.get(name), per[GN]["first_call_s"]
    if r is None:
        return "n/a"
    if "first_call_s" in r:
        v = r["first_call_s"] / gn
        return _bold(f"{v:.2f}x", v > MANY_COMPILE_RATIO)
    if "timeout_s" in r:
        return "not tried" if "skipped" in r else f"cut off ({r['timeout_s']:.0f} s)"
    return "error"


def tables(result: dict) -> str:
    meta, step = result["meta"], {r["tree"]: r for r in result["step"]}
    trees = [(k, label) for k, label in TREES if k in step]
    lines = []
    head = " | ".join(label for _, label in trees)
    sep = "|---" * (len(trees) + 1) + "|"
    where = "XLA:CPU" if meta.get("platform") == "cpu" else str(meta.get("device", "?"))
    lines += [f"| chain + adam, step time, {where} | {head} | target |", sep + "---|"]
    adam = [step[k]["entries"].get("adam", {}).get("step_s") for k, _ in trees]
    lines.append("| adam alone | " + " | ".join(
        f"{1e3 * a:.1f} ms" if a else "n/a" for a in adam) + " | |")
    for label, pairs, target in STEP_ROWS:
        lines.append(f"| {label} | " + " | ".join(_step_cell(step[k], pairs) for k, _ in trees)
                     + f" | {target} |")
    lines += ["", f"| temporaries / tree | {head} |", sep]
    for label, names in TEMP_ROWS:
        lines.append(f"| {label} | " + " | ".join(
            _temp_cell(step[k], result["targets"], names) for k, _ in trees) + " |")
    lines += ["", f"| first call (compile), chain + adam | {head} |", sep]
    for label, cell_sep, cells in FIRST_ROWS:
        lines.append(f"| {label} | " + " | ".join(
            _first_cell(step[k], result["targets"], cell_sep, cells) for k, _ in trees) + " |")
    own = [(t["tree"], t["value"], t["met"]) for t in result["targets"]
           if t["what"] == "first call: agc / optax.adaptive_grad_clip (chains)"]
    if own:
        lines += ["", "(`agc`'s own first-call target, <= 2x Optax's AGC chain: " + ", ".join(
            f"{v} on {dict(TREES).get(tr, tr)} ({'met' if m else 'missed'})"
            for tr, v, m in own) + ".)"]
    many = result.get("many") or {}
    res = many.get("results") or {}
    # the trees where the global norm's own update compiled within the cap
    mtrees = [t for t in many.get("trees", [])
              if "first_call_s" in res.get(t, {}).get(GN, {})]
    if mtrees:
        counts = " | ".join(f"{many['trees'][t]['leaves']:,} leaves" for t in mtrees)
        lines += ["", f"| `update` alone, first call / the global norm's | {counts} |",
                  "|---" * (len(mtrees) + 1) + "|"]
        lines.append("| `clip_by_global_norm` | " + " | ".join(
            f"{res[t][GN]['first_call_s']:.2f} s" for t in mtrees) + " |")
        for n in MANY_ROWS:
            lines.append(f"| `{n}` | " + " | ".join(_many_cell(res[t], n) for t in mtrees)
                         + " |")
    at = f"optclip at {meta['commit']}, " if meta.get("commit") else ""
    lines += ["", f"({at}jax {meta['jax']}, optax {meta['optax']}, {meta.get('cpus', '?')} "
              f"CPU cores, {meta.get('device', '?')}: `{command_line(meta)}`.)"]
    return "\n".join(lines)


def readme_block(readme: str) -> str:
    """The text between README's markers (without them)."""
    start = readme.index(START) + len(START)
    return readme[start:readme.index(END, start)].strip("\n")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0] if argv else "bench/results/results.json")
    print(tables(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
