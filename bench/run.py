"""optclip's benchmark: every clipper and guard against Optax, side by side, in one run.

For each step tree (GPT-2 small, ResNet-50), every chain ``clipper + adam`` is
compiled (trace + lower + compile: the first call's overhead, the median of
``--first-reps`` rounds, each in a fresh process; and the compiled step's temp bytes),
then timed with params and optimizer state donated, the
repetitions of the chains that are compared interleaved (round robin, order
rotated every round), and reported as medians and as *ratios* to a baseline
timed in the same rounds (the machines are shared and noisy: absolute times mean
little). Then, on trees of 1,000 to 5,000 small leaves of mixed shapes, each
clipper's ``update`` alone is compiled in a subprocess, cut off after
``--max-compile-s``, ``--many-reps`` times in rounds (JAX's caches cleared before
each; the worker's earlier compiles pay XLA's one-off costs), a cell the median. A
table says which of the issue's targets are met.

Run:  python -m bench                          (gpt2, resnet50, many1000..many5000)
      python -m bench --quick                  (tiny trees, seconds; what the test suite runs)
      python -m bench --trees gpt2 --many-trees "" --clippers agc,zclip --reps 7 --out DIR
It runs unchanged on a GPU: JAX's default device is used (``--backend`` picks another).
``--out DIR`` writes results.md (the tables), results.json and bench.log (this output).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import queue
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optclip  # noqa: F401  (the package measured; imported here so a broken one fails early)

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.clippers import GN, OPTCLIP, STEP_ONLY, entries, needed, step_ratios  # noqa: E402
from bench.trees import (  # noqa: E402
    MANY_TREES,
    STEP_TREES,
    TREES,
    abstract_tree,
    make_tree,
    n_params,
    tree_bytes,
)

TEMP_FRACTION = 0.05  # target: the compiled step's temp buffers < 5% of the tree
COMPILE_RATIO = 1.5  # target: first call <= 1.5x Optax's equivalent's ...
COMPILE_SLACK_S = 1.0  # ... or <= the global-norm chain's + 1 s
MANY_COMPILE_RATIO = 2.0  # many leaves: update's first call <= 2x clip_by_global_norm's
MANY_TEMP_RATIO = 1.0  # many leaves: temp bytes <= the gradients' bytes
LINEAR_EXPONENT = 1.2  # many leaves: "about linear" growth, t ~ leaves^k with k <= this
REPO = Path(__file__).resolve().parent.parent
CHAIN_COMPILE_S = 600.0  # a step tree's chain compiled in a worker: cut off after this


# ---- compiling and timing ---------------------------------------------------------------------

def temp_bytes(compiled) -> int | None:
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


def constant_outputs(compiled) -> list[int]:
    """The outputs of a compiled computation that are compile-time constants (by index into
    its flat outputs), in XLA's optimized HLO: an output computed from constants alone
    (``constant``, and copies, bitcasts, broadcasts, iotas and fusions of nothing but
    constants). Empty arrays are left out. On a GPU such an output costs far more than its
    size (see ``optclip.stats._computed``). Written for XLA:CPU's HLO: on XLA:GPU's it found
    none where there were two."""
    entry = compiled.as_text().split("ENTRY")[-1]
    defs: dict[str, tuple[str, list[str], bool]] = {}
    root = None
    for line in entry.splitlines():
        m = re.match(r"\s*(ROOT )?(%[\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*?)\)", line)
        if m:
            empty = bool(re.fullmatch(r"\w+\[([\d,]*,)?0(,[\d,]*)?\](\{.*\})?", m.group(3)))
            defs[m.group(2)] = (m.group(4), re.findall(r"%[\w.\-]+", m.group(5)), empty)
            if m.group(1):
                root = m.group(2)
    if root is None:
        return []
    seen: dict[str, bool] = {}

    def constant(name: str) -> bool:
        if name not in seen:
            op, args, _ = defs.get(name, ("?", [], False))
            seen[name] = op == "constant" or (
                op in ("copy", "bitcast", "broadcast", "iota", "reshape", "transpose", "fusion")
                and all(constant(a) for a in args))
        return seen[name]

    outs = defs[root][1] if defs[root][0] == "tuple" else [root]
    return [i for i, a in enumerate(outs) if constant(a) and not defs.get(a, ("", [], False))[2]]


def lower_and_compile(fn, *args) -> tuple[Any, float, float]:
    """(compiled, seconds to trace and lower, seconds to compile)."""
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, t1 - t0, time.perf_counter() - t1


def train_step(tx: optax.GradientTransformation):
    def f(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s
    return jax.jit(f, donate_argnums=(0, 1))


@dataclass
class Measured:
    """One compiled computation, and how to feed it: ``carry = compiled(*carry, *rest)``."""
    key: str
    compiled: Any
    make_carry: Callable[[], tuple]  # fresh inputs, donated
    rest: tuple  # inputs not donated
    chain: bool = True  # the outputs are the next call's carry
    live_bytes: int = 0  # what its carry holds
    info: dict = field(default_factory=dict)


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def shared_buffers(state) -> list[str]:
    """Paths of the leaves of a fresh state that are the same array as an earlier leaf."""
    seen: dict[int, str] = {}
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        if isinstance(x, jax.Array):
            key = jax.tree_util.keystr(path)
            if id(x) in seen:
                out.append(f"{key} is {seen[id(x)]}")
            seen.setdefault(id(x), key)
    return out


def compile_all(keys: list[str], params, grads, first_reps: int = 1, tree: str | None = None,
                backend: str | None = None) -> dict[str, Measured]:
    """Every computation of a step tree compiled here: the floors, the global-norm clips alone
    and each chain's train step, JAX's caches cleared before each compile.

    With ``first_reps > 1`` (and ``tree``, its name in ``TREES``), each chain is compiled
    ``first_reps`` more times, each round in a fresh worker process (``bench.worker``; each
    round's order offset by a share of the chains), and its first call is the median of
    those rounds, as a user's first call in a fresh process is; the program timed is this
    process's, whose compile is kept apart (``first_call_here_s``): in this process, rounds
    after the first compiled about 10% slower (``bench/results/cpu_bench_medians/``), and
    the first, after the other tree's timing, slower or faster by run. One compile varies
    by up to about 1 s on a shared machine."""
    reg = entries()
    p_s = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    size = tree_bytes(params)
    out: dict[str, Measured] = {}

    def add(key, fn, args, make_carry, rest, chain=True, live=0, **info):
        jax.clear_caches()
        compiled, lower_s, compile_s = lower_and_compile(fn, *args)
        tb = temp_bytes(compiled)
        m = Measured(key, compiled, make_carry, rest, chain, live,
                     {"lower_s": lower_s, "compile_s": compile_s,
                      "first_call_s": lower_s + compile_s, "temp_bytes": tb,
                      "temp_fraction": None if tb is None else tb / size,
                      "first_call_samples": [(lower_s + compile_s, lower_s, compile_s)],
                      **info})
        out[key] = m
        print(f"  compiled {key:<34} first call {lower_s + compile_s:7.2f} s"
              f"  temp {_fmt_bytes(tb):>10}", flush=True)

    # memory floors and the global-norm clips alone (for the floor ratios in results.md)
    if GN in keys:
        add("floor_read", jax.jit(lambda g: sum(jnp.sum(x) for x in jax.tree.leaves(g))),
            (p_s,), lambda: (grads,), (), chain=False, described="read the tree once")
        add("floor_read_write", jax.jit(lambda g: jax.tree.map(lambda x: x * 0.999, g),
                                        donate_argnums=0),
            (p_s,), lambda: (_copy(grads),), (), live=size,
            described="read and write the tree once, in place")
        for name in (GN, "optax.clip_by_global_norm", "fused_global_norm"):
            tx = reg[name].alone()
            s_s = jax.eval_shape(tx.init, p_s)
            add(f"alone/{name}", jax.jit(lambda u, s, p, tx=tx: tx.update(u, s, p),
                                         donate_argnums=(0, 1)),
                (p_s, s_s, p_s), lambda tx=tx: (_copy(grads), _copy(tx.init(params))), (params,),
                live=size + tree_bytes(s_s), described=f"{name}'s update alone")
    for key in keys:
        e = reg[key]
        tx = e.chain()
        s_s = jax.eval_shape(tx.init, p_s)
        # the carries are copies: a fresh state that holds a buffer twice cannot be donated
        # as it is (the DESIGN's "Donatable"); that is recorded, and the timing goes on
        add(key, train_step(tx), (p_s, s_s, p_s),
            lambda tx=tx: (_copy(params), _copy(tx.init(params))), (grads,),
            live=size + tree_bytes(s_s), described=e.described,
            shared_state_buffers=shared_buffers(tx.init(params)))
    chains = [k for k in keys if k in out]
    fresh: dict[str, list[tuple[float, float, float]]] = {k: [] for k in chains}
    for r in range(first_reps if tree and first_reps > 1 else 0):
        k = r * len(chains) // first_reps
        tasks = [(tree, key, "chain") for key in chains[k:] + chains[:k]]
        results, _ = run_worker(tasks, CHAIN_COMPILE_S, backend)
        for i, res in results.items():
            if "first_call_s" in res:
                fresh[tasks[i][1]].append((res["first_call_s"], res["lower_s"],
                                           res["compile_s"]))
        print(f"  first calls, round {r + 1} of {first_reps} (a fresh process): " + ", ".join(
            f"{key} {res['first_call_s']:.2f} s" if "first_call_s" in res else f"{key} n/a"
            for key, res in ((tasks[i][1], results.get(i, {})) for i in range(len(tasks)))),
            flush=True)
    for key, m in out.items():
        samples = m.info.pop("first_call_samples")
        if fresh.get(key):  # this process's compile kept apart, as "first_call_here_s"
            m.info["first_call_here_s"] = samples[0][0]
            samples = fresh[key]
        m.info["first_call_samples_s"] = [x[0] for x in samples]
        first, lower, comp = median_sample(samples)
        m.info.update(first_call_s=first, lower_s=lower, compile_s=comp)
    return out


def time_group(ms: list[Measured], reps: int, warmup: int, steps: int = 1
               ) -> dict[str, list[float]]:
    """Interleaved: each round runs every member once (order rotated), after ``warmup`` rounds.

    With ``steps > 1`` a member's turn is ``steps`` calls back to back (each call's outputs
    the next one's carry) and one wait at the end, and its time is the mean per call: on an
    accelerator a single step of a few milliseconds measures the host's dispatch and the
    wait as much as the device, and varies by 10-30% from round to round.
    """
    carries = {m.key: m.make_carry() for m in ms}
    times: dict[str, list[float]] = {m.key: [] for m in ms}
    for r in range(warmup + reps):
        k = r % len(ms)
        for m in ms[k:] + ms[:k]:
            t0 = time.perf_counter()
            for _ in range(steps):
                out = m.compiled(*carries[m.key], *m.rest)
                if m.chain:
                    carries[m.key] = out if isinstance(out, tuple) else (out,)
            jax.block_until_ready(out)
            dt = (time.perf_counter() - t0) / steps
            if r >= warmup:
                times[m.key].append(dt)
    del carries
    return times


def time_chains(chains: dict, tree: str, reps: int, steps: int = 1) -> dict:
    """Side-by-side scripts' timing: each chain's train step compiled as the benchmark
    compiles it (params and state donated), on ``tree``'s gradients, its first call printed,
    and all of them timed in one interleaved group (:func:`time_group`, one warm-up round).
    Returns ``{"group_step_s": {"all": medians}, "group_times_s": {"all": times}}``, as
    :func:`paired_ratio` reads it (seconds)."""
    shapes = TREES[tree]()
    grads = make_tree(shapes, seed=0)
    params = make_tree(shapes, seed=1, scale=0.1)
    p_s = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    width = max(map(len, chains))
    ms = []
    for key, tx in chains.items():
        s_s = jax.eval_shape(tx.init, p_s)
        compiled, lo, co = lower_and_compile(train_step(tx), p_s, s_s, p_s)
        ms.append(Measured(key, compiled, lambda tx=tx: (_copy(params), _copy(tx.init(params))),
                           (grads,), True, tree_bytes(params)))
        print(f"  {key:<{width}} first call {lo + co:6.2f} s", flush=True)
    times = time_group(ms, reps, 1, steps)
    return {"group_step_s": {"all": {k: statistics.median(v) for k, v in times.items()}},
            "group_times_s": {"all": times}}


def live_budget(override_gb: float | None) -> float:
    """Bytes the interleaved carries may hold at once."""
    if override_gb is not None:
        return override_gb * 2**30
    dev = jax.devices()[0]
    try:
        stats = dev.memory_stats() or {}
    except Exception:
        stats = {}
    if stats.get("bytes_limit"):
        return 0.6 * stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return 0.5 * int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def plan_groups(names: list[str], ms: dict[str, Measured], budget: float) -> dict[str, list[str]]:
    """All in one interleaved group if the carries fit in ``budget``, else one per comparison.

    A comparison group is a subject with every baseline of its ratios, so that each ratio
    is taken between times measured in the same rounds.
    """
    if sum(m.live_bytes for m in ms.values()) <= budget:
        return {"all": list(ms)}
    groups: dict[str, list[str]] = {}
    if "floor_read" in ms:
        groups["floors"] = [k for k in ms if k.startswith(("floor_", "alone/"))]
    for n in names:
        members = [n] + [den for num, den, _ in step_ratios([n]) if num == n]
        members += [num for num, den, _ in step_ratios([n]) if num != n]
        groups[n] = [k for k in dict.fromkeys(members) if k in ms]
    covered = {k for g in groups.values() for k in g}
    for k in ms:  # entries no ratio names (selected baselines): timed on their own
        if k not in covered:
            groups[k] = [k]
    return groups


def bench_step_tree(tree: str, names: list[str], reps: int, warmup: int,
                    budget_gb: float | None, steps: int = 1, first_reps: int = 1,
                    backend: str | None = None) -> dict:
    shapes = TREES[tree]()
    grads = make_tree(shapes, seed=0)
    params = make_tree(shapes, seed=1, scale=0.1)
    size = tree_bytes(params)
    keys = needed(names)
    print(f"\n{tree}: {len(shapes)} leaves, {n_params(shapes) / 1e6:.1f}M params, "
          f"{_fmt_bytes(size)}; chains: {', '.join(keys)}", flush=True)
    ms = compile_all(keys, params, grads, first_reps, tree, backend)
    groups = plan_groups(names, ms, live_budget(budget_gb))
    print(f"  timing {len(groups)} interleaved group(s), {reps} rounds of {steps} step(s) after "
          f"{warmup} warm-up", flush=True)
    group_times: dict[str, dict[str, list[float]]] = {}
    for gname, members in groups.items():
        group_times[gname] = time_group([ms[k] for k in members], reps, warmup, steps)
        print(f"  group {gname}: " + ", ".join(
            f"{k} {statistics.median(v) * 1e3:.2f} ms" for k, v in group_times[gname].items()),
            flush=True)
    res: dict[str, Any] = {"tree": tree, "leaves": len(shapes), "params": n_params(shapes),
                           "tree_bytes": size, "reps": reps, "steps": steps,
                           "first_reps": first_reps, "groups": groups,
                           "group_step_s": {g: {k: statistics.median(v) for k, v in t.items()}
                                            for g, t in group_times.items()},
                           "group_times_s": group_times, "entries": {}}
    for key, m in ms.items():
        all_times = [t for g in group_times.values() for t in g.get(key, [])]
        res["entries"][key] = {**m.info, "step_s": statistics.median(all_times),
                               "step_times_s": all_times}
    res["ratios"] = tree_ratios(res, names)
    return res


def group_ratio(res: dict, num: str, den: str) -> float | None:
    """num / den from the group where both were timed (the subject's group first)."""
    gs = res["group_step_s"]
    for g in [num, "all", "floors", *gs]:
        if g in gs and num in gs[g] and den in gs[g]:
            return gs[g][num] / gs[g][den]
    return None


def _commit() -> str | None:
    """The checkout's commit, with ``+changes`` when optclip or bench differ from it (None
    outside a git checkout)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "optclip", "bench",
                                ":!bench/results"],
                               cwd=root, text=True, capture_output=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def command_line(meta: dict) -> str:
    """The run's command, with the ``GLIBC_TUNABLES`` it ran under: on XLA:CPU they decide
    whether a step's temporaries are page-faulted afresh at every step, which the guards'
    and ``clippy``'s step times follow (``bench/results/cpu_malloc/``)."""
    env = meta.get("glibc_tunables")
    return (f"GLIBC_TUNABLES={shlex.quote(env)} " if env else "") + shlex.join(
        ["python", "-m", "bench", *meta.get("argv", [])])


def paired_ratio(res: dict, num: str, den: str) -> float | None:
    """The median over rounds of num's time / den's time in the same round.

    The rounds of one group interleave its members, so a round's ratio compares two chains
    timed moments apart: a stretch of slow rounds (another tenant on the machine, a clock
    change) moves both. The ratio of medians, ``group_ratio``, is what the targets are
    judged on; this one is printed beside it, and where the two differ by more than a few
    percent, the rounds drifted.
    """
    gt = res.get("group_times_s", {})
    for g in [num, "all", "floors", *gt]:
        if g in gt and num in gt[g] and den in gt[g]:
            a, b = gt[g][num], gt[g][den]
            return statistics.median(x / y for x, y in zip(a, b, strict=True))
    return None


def tree_ratios(res: dict, names: list[str]) -> list[dict]:
    rows = []
    for num, den, bound in step_ratios(names):
        v = group_ratio(res, num, den)
        if v is not None:
            rows.append({"num": num, "den": den, "ratio": v, "bound": bound,
                         "paired": paired_ratio(res, num, den)})
    if "floor_read" in res["entries"]:
        for num, den in ((f"alone/{GN}", "floor_read_write"),
                         ("alone/optax.clip_by_global_norm", "floor_read_write"),
                         (f"alone/{GN}", "floor_read")):
            v = group_ratio(res, num, den)
            if v is not None:
                rows.append({"num": num, "den": den, "ratio": v, "bound": None,
                             "paired": paired_ratio(res, num, den)})
        g = res["group_step_s"].get("floors") or res["group_step_s"]["all"]
        fr, frw, gn = g.get("floor_read"), g.get("floor_read_write"), g.get(f"alone/{GN}")
        if fr and frw and gn:  # the physical floor: read the tree for the norm, then rewrite it
            rows.append({"num": f"alone/{GN}", "den": "floor_read + floor_read_write",
                         "ratio": gn / (fr + frw), "bound": None})
    return rows


# ---- many leaves: compile times in a subprocess, with a cut-off -------------------------------

def _reader(stream, q: queue.Queue) -> None:
    for line in stream:
        q.put(line)
    q.put(None)


def run_worker(tasks: list[tuple[str, ...]], max_s: float, backend: str | None,
               ready_s: float = 300.0) -> tuple[dict[int, dict], list[tuple[str, ...]]]:
    """Run ``tasks`` (``(tree, clipper)``, or ``(tree, clipper, "chain")`` for the chain's
    train step: ``bench.worker``) in one worker until done or one runs past ``max_s``.

    Returns (results by task index, the tasks not attempted).
    """
    env = dict(os.environ)
    # the worker compiles only (abstract inputs): on a GPU it must not preallocate the memory
    # that this process already holds
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if backend:
        env["OPTCLIP_BENCH_BACKEND"] = backend
    proc = subprocess.Popen([sys.executable, "-m", "bench.worker"], cwd=REPO, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, q), daemon=True).start()
    proc.stdin.write(json.dumps(tasks))
    proc.stdin.close()
    results: dict[int, dict] = {}
    current, started = None, time.perf_counter()
    rest: list[tuple[str, ...]] = []
    while True:
        limit = max_s if current is not None else ready_s
        try:
            line = q.get(timeout=max(0.0, limit - (time.perf_counter() - started)))
        except queue.Empty:
            proc.kill()
            if current is None:
                results.update({i: {"error": f"worker not ready after {ready_s:.0f} s"}
                                for i in range(len(tasks))})
            else:
                results[current] = {"timeout_s": max_s}
                rest = tasks[current + 1:]
            break
        if line is None:  # the worker exited
            rc = proc.wait()
            start = 0 if current is None else current
            if current is not None and current not in results:
                results[current] = {"error": f"worker died (exit {rc})"}
                start = current + 1
            rest = [t for i, t in enumerate(tasks) if i >= start and i not in results]
            if current is None and not results:
                results.update({i: {"error": f"worker died before starting (exit {rc})"}
                                for i in range(len(tasks))})
                rest = []
            break
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "start" in msg:
            current, started = msg["start"], time.perf_counter()
        elif "i" in msg:
            results[msg["i"]] = msg
            current = None
            t, c = tasks[msg["i"]][:2]
            print("  " + (f"{t:>10} {c:<28} first call {msg['first_call_s']:7.2f} s  temp "
                          f"{_fmt_bytes(msg['temp_bytes']):>10}" if "error" not in msg
                          else f"{t:>10} {c:<28} error: {msg['error'][:200]}"), flush=True)
    proc.wait()
    return results, rest


def bench_many(trees: list[str], names: list[str], max_s: float,
               backend: str | None, reps: int = 1) -> dict:
    """First-call time and temp bytes of every clipper's ``update`` alone, per tree.

    Each update is compiled ``reps`` times, in rounds (every update once a round, each
    round's order offset by a share of the updates), with JAX's caches cleared before each
    compile, and a cell is the median of its samples: one first call varies by more than
    the 2x target's margin. An update cut off is not compiled again, on that tree or a
    larger one; one that fails keeps its error, and a restarted worker (after a cut-off, or
    a compile that killed it) is not sent its later rounds.
    """
    trees = sorted(trees, key=lambda t: len(TREES[t]()))
    reg = entries()
    keys = [k for k in needed(names)
            if k != "adam" and reg[k].kind != "baseline" and k not in STEP_ONLY]
    keys += ["fused_global_norm"]
    print(f"\nmany leaves: {', '.join(trees)}; update alone of {', '.join(keys)}; "
          f"{reps} round{'s' if reps > 1 else ''}; cut-off {max_s:.0f} s", flush=True)
    out: dict[str, dict[str, dict]] = {t: {} for t in trees}
    for t in trees:
        shapes = TREES[t]()
        print(f"  {t}: {len(shapes)} leaves, {n_params(shapes)} params", flush=True)
    timed_out: set[str] = set()
    for t in trees:  # smallest first: a clipper cut off on one tree is not tried on larger ones
        samples: dict[str, list[dict]] = {k: [] for k in keys}
        cells: dict[str, dict] = {}
        for k in keys:
            if k in timed_out:
                cells[k] = {"timeout_s": max_s, "skipped": "cut off on a smaller tree"}
        live = [k for k in keys if k not in timed_out]
        # each round's order offset by a share of the updates (by one, most would keep
        # their neighbours and their place)
        pending = [(t, live[(i + r * len(live) // reps) % len(live)]) for r in range(reps)
                   for i in range(len(live))]
        while pending:
            results, rest = run_worker(pending, max_s, backend)
            for i, r in results.items():
                k = pending[i][1]
                if k in cells:
                    continue
                if "timeout_s" in r:
                    timed_out.add(k)
                    cells[k] = {**r, "samples_s": [x["first_call_s"] for x in samples[k]]}
                    print(f"  {t:>10} {k:<28} first call > {max_s:.0f} s (cut off)",
                          flush=True)
                elif "first_call_s" not in r:  # an error: that cell's answer
                    cells[k] = r
                else:
                    samples[k].append(r)
            # a restarted worker is not sent the later rounds of an update cut off or failed
            pending = [x for x in rest if x[1] not in cells]
        out[t] = {k: cells[k] if k in cells else _many_median(samples[k]) for k in keys}
    info = {t: {"leaves": len(TREES[t]()), "params": n_params(TREES[t]()),
                "tree_bytes": tree_bytes(abstract_tree(TREES[t]()))} for t in trees}
    return {"trees": info, "results": out, "max_compile_s": max_s, "reps": reps}


def median_sample(samples: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """The median of ``(first call, trace + lower, compile)`` samples by first call, with
    that sample's parts (of the two middle ones, their means), so that the parts sum to the
    first call."""
    mid = sorted(samples)
    n = len(mid)
    return tuple(statistics.mean(v) for v in zip(*mid[(n - 1) // 2:n // 2 + 1], strict=True))


def _many_median(samples: list[dict]) -> dict:
    """One many-leaves cell from its samples (each a first call): :func:`median_sample`,
    the samples' first calls in the order taken, and the temp bytes (the same compiled
    program every time)."""
    if not samples:
        return {"error": "not run"}
    first, lower, comp = median_sample([(x["first_call_s"], x["lower_s"], x["compile_s"])
                                        for x in samples])
    return {"first_call_s": first, "lower_s": lower, "compile_s": comp,
            "samples_s": [x["first_call_s"] for x in samples],
            "temp_bytes": samples[0]["temp_bytes"], "tree_bytes": samples[0]["tree_bytes"]}


# ---- targets and report -----------------------------------------------------------------------

def _fmt_bytes(b: int | None) -> str:
    if b is None:
        return "n/a"
    for unit, div in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if b >= div:
            return f"{b / div:.1f} {unit}"
    return f"{b} B"


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def targets(step: list[dict], many: dict | None, names: list[str]) -> list[dict]:
    reg = entries()
    rows: list[dict] = []
    for res in step:
        tree, ent = res["tree"], res["entries"]
        for r in res["ratios"]:
            if r["bound"] is not None:
                paired = f" (paired {r['paired']:.3f}x)" if r.get("paired") else ""
                rows.append({"tree": tree, "what": f"step: {r['num']} / {r['den']}",
                             "value": f"{r['ratio']:.3f}x{paired}", "target": f"<= {r['bound']}",
                             "met": r["ratio"] <= r["bound"]})
        if "agc" in names and "optax.adaptive_grad_clip" in ent:
            v = ent["agc"]["first_call_s"] / ent["optax.adaptive_grad_clip"]["first_call_s"]
            rows.append({"tree": tree,
                         "what": "first call: agc / optax.adaptive_grad_clip (chains)",
                         "value": f"{v:.2f}x", "target": "<= 2", "met": v <= 2})
        for n in names:
            cp = reg[n].counterpart
            fc = ent[n]["first_call_s"]
            v = fc / ent[cp]["first_call_s"]
            alt = None if n == GN else fc - ent[GN]["first_call_s"]
            ok = v <= COMPILE_RATIO or (alt is not None and alt <= COMPILE_SLACK_S)
            rows.append({"tree": tree, "what": f"first call: {n} / {cp}",
                         "value": f"{v:.2f}x" + ("" if alt is None else
                                                f" ({alt:+.1f} s vs {GN})"),
                         "target": f"<= {COMPILE_RATIO}x, or <= {GN} + {COMPILE_SLACK_S:.0f} s",
                         "met": ok})
        for n in names:
            sh = ent[n].get("shared_state_buffers", [])
            rows.append({"tree": tree, "what": f"donatable: {n} chain's fresh state",
                         "value": "; ".join(sh) if sh else "no buffer twice",
                         "target": "no buffer twice", "met": not sh})
        for n in names:
            tf = ent[n]["temp_fraction"]
            rows.append({"tree": tree, "what": f"temp bytes: {n} chain / tree",
                         "value": "n/a" if tf is None else f"{100 * tf:.2f}%",
                         "target": f"< {100 * TEMP_FRACTION:.0f}%",
                         "met": None if tf is None else tf < TEMP_FRACTION})
    if many:
        for t, per in many["results"].items():
            gn = per.get(GN, {}).get("first_call_s")
            size = many["trees"][t]["tree_bytes"]
            for n in (n for n in names if n not in STEP_ONLY):
                r = per.get(n, {})
                if "first_call_s" in r:
                    v = r["first_call_s"] / gn if gn else None
                    pr = many_paired(per, n)
                    pv = "" if pr is None else f" (per round {pr:.2f}x)"
                    rows.append({"tree": t, "what": f"first call: {n} update / {GN}'s",
                                 "value": "n/a" if v is None else f"{v:.2f}x{pv}",
                                 "target": f"<= {MANY_COMPILE_RATIO:.0f}x",
                                 "met": None if v is None else v <= MANY_COMPILE_RATIO})
                    tb = r.get("temp_bytes")
                    rows.append({"tree": t, "what": f"temp bytes: {n} update / gradients",
                                 "value": "n/a" if tb is None else f"{tb / size:.2f}x",
                                 "target": f"<= {MANY_TEMP_RATIO:.0f}x",
                                 "met": None if tb is None else tb / size <= MANY_TEMP_RATIO})
                else:
                    what = ("> {:.0f} s{}".format(r["timeout_s"], " (" + r["skipped"] + ")"
                                                  if "skipped" in r else "")
                            if "timeout_s" in r
                            else "error: " + r.get("error", "not run")[:80])
                    rows.append({"tree": t, "what": f"first call: {n} update / {GN}'s",
                                 "value": what, "target": f"<= {MANY_COMPILE_RATIO:.0f}x",
                                 "met": False})
        for n in names:
            k = growth_exponent(many, n)
            if k is not None:
                ts = list(many["results"])
                rows.append({"tree": f"{ts[0]}..{ts[-1]}",
                             "what": f"compile growth: {n} update, t ~ leaves^k",
                             "value": f"k = {k:.2f}", "target": f"k <= {LINEAR_EXPONENT} "
                             "(about linear)", "met": k <= LINEAR_EXPONENT})
    return rows


def many_paired(per: dict, name: str) -> float | None:
    """The median over rounds of ``name``'s first call / the global norm's in the same round,
    on one many-leaves tree; None with fewer than two rounds of both."""
    a = per.get(name, {}).get("samples_s") or []
    b = per.get(GN, {}).get("samples_s") or []
    if len(a) < 2 or len(a) != len(b):
        return None
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def growth_exponent(many: dict, name: str) -> float | None:
    pts = [(many["trees"][t]["leaves"], per[name]["first_call_s"])
           for t, per in many["results"].items() if "first_call_s" in per.get(name, {})]
    if len(pts) < 2 or pts[0][0] == pts[-1][0]:
        return None
    (n0, t0), (n1, t1) = pts[0], pts[-1]
    return math.log(t1 / t0) / math.log(n1 / n0)


def markdown(step: list[dict], many: dict | None, rows: list[dict], meta: dict) -> str:
    reg = entries()
    L = [f"Device: {meta['device']}; jax {meta['jax']}, optax {meta['optax']}. "
         f"Command: `{command_line(meta)}`", ""]
    for res in step:
        ent = res["entries"]
        L += [f"### {res['tree']}: {res['leaves']} leaves, {res['params'] / 1e6:.1f}M params "
              f"({_fmt_bytes(res['tree_bytes'])}), medians of {res['reps']} interleaved rounds"
              + (f" of {res['steps']} steps each" if res.get("steps", 1) > 1 else "")
              + (f"; first calls medians of {res['first_reps']} compiles"
                 if res.get("first_reps", 1) > 1 else ""), "",
              "| chain | step (ms) | / adam | / global-norm chain | / counterpart "
              "| first call (s) | / counterpart | temp | temp / tree |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key, e in ent.items():
            cp = reg[key].counterpart if key in reg else None

            def r(den, key=key, res=res, ent=ent):
                v = group_ratio(res, key, den) if den and den in ent and den != key else None
                return "" if v is None else f"{v:.2f}x"
            fc_cp = (f"{e['first_call_s'] / ent[cp]['first_call_s']:.2f}x"
                     if cp and cp in ent else "")
            tf = e["temp_fraction"]
            L.append(f"| {e.get('described', reg[key].described if key in reg else key)} "
                     f"(`{key}`) | {e['step_s'] * 1e3:.2f} | {r('adam')} | {r(GN)} | "
                     f"{r(cp) if cp != 'adam' else ''} | {e['first_call_s']:.2f} | {fc_cp} | "
                     f"{_fmt_bytes(e['temp_bytes'])} | "
                     f"{'' if tf is None else f'{100 * tf:.2f}%'} |")
        extra = [x for x in res["ratios"] if x["num"].startswith("alone/")]
        if extra:
            L += [""] + [f"- {x['num']} / {x['den']}: {x['ratio']:.2f}x" for x in extra]
        L.append("")
    if many:
        ts = list(many["results"])
        mr = many.get("reps", 1)
        L += [f"### Many leaves: each transformation's `update` alone, first call (trace + lower"
              f" + compile), cut off at {many['max_compile_s']:.0f} s"
              + (f", medians of {mr} rounds" if mr > 1 else ""), "",
              "| update | " + " | ".join(f"{t} ({many['trees'][t]['leaves']} leaves)"
                                        for t in ts) + " | growth k (t ~ leaves^k) |",
              "|---|" + "---:|" * (len(ts) + 1)]
        keys = list(dict.fromkeys(k for t in ts for k in many["results"][t]))
        for k in keys:
            cells = []
            for t in ts:
                r = many["results"][t].get(k, {})
                gn = many["results"][t].get(GN, {}).get("first_call_s")
                if "first_call_s" in r:
                    rel = f" ({r['first_call_s'] / gn:.2f}x)" if gn and k != GN else ""
                    tb = r.get("temp_bytes")
                    temp = ("" if tb is None else
                            f", temp {tb / many['trees'][t]['tree_bytes']:.2f}x")
                    cells.append(f"{r['first_call_s']:.2f} s{rel}{temp}")
                elif "timeout_s" in r:
                    cells.append(f"> {r['timeout_s']:.0f} s" + (" (not tried)" if "skipped" in r
                                                                else ""))
                else:
                    cells.append("error" if r else "-")
            gk = growth_exponent(many, k)
            gks = "" if gk is None else f"{gk:.2f}"
            L.append(f"| `{k}` | " + " | ".join(cells) + f" | {gks} |")
        L += ["", "(ratio to `clip_by_global_norm`'s update on the same tree; temp: compiled temp "
              "bytes / the gradients' bytes; \"not tried\": cut off on a smaller tree; guards "
              "wrap `optax.identity()`)", ""]
    L += ["### Targets", "", "| tree | measurement | value | target | met |",
          "|---|---|---:|---|---|"]
    for x in rows:
        L.append(f"| {x['tree']} | {x['what']} | {x['value']} | {x['target']} | {_met(x['met'])} |")
    n_ok = sum(1 for x in rows if x["met"] is True)
    n_no = sum(1 for x in rows if x["met"] is False)
    L += ["", f"{n_ok} targets met, {n_no} not met."]
    return "\n".join(L)


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self):
        for st in self.streams:
            st.flush()


def _warm_up() -> None:
    """One throwaway compile and step: the first in a process pays one-off costs."""
    p = make_tree(TREES["tiny"]())
    tx = entries()[GN].chain()
    f = train_step(tx)
    jax.block_until_ready(f(_copy(p), tx.init(p), p))


def _positive(s: str) -> int:
    n = int(s)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {n}")
    return n


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny trees, 2 rounds; seconds")
    p.add_argument("--trees", default=None,
                   help=f"step-time trees, comma list of {sorted(TREES)} "
                        f"(default {','.join(STEP_TREES)}; '' for none)")
    p.add_argument("--many-trees", "--compile-trees", dest="many_trees", default=None,
                   help=f"many-leaves trees for compile times (default {','.join(MANY_TREES)};"
                        " '' for none)")
    p.add_argument("--clippers", default="all",
                   help=f"comma list of {','.join(OPTCLIP)} (default all; baselines follow)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 7; --quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per member per round, one wait at the end (default 1 on CPU, "
                        "20 on an accelerator, where one step is too short to time alone)")
    p.add_argument("--max-compile-s", type=float, default=None,
                   help="many leaves: cut off a compile after this (default 120; --quick 60)")
    p.add_argument("--first-reps", type=_positive, default=None,
                   help="step trees: first calls of each chain, each round in a fresh "
                        "process, its first call their median (default 3; --quick 1: "
                        "this process's compile)")
    p.add_argument("--many-reps", type=_positive, default=None,
                   help="many leaves: first calls of each update, in rounds, a cell their "
                        "median (default 3; --quick 1)")
    p.add_argument("--max-live-gb", type=float, default=None,
                   help="memory the interleaved carries may hold; above it, chains are timed "
                        "in comparison groups (default: half the free memory)")
    p.add_argument("--backend", default=None, help="cpu, gpu, tpu (default: JAX's default)")
    p.add_argument("--out", default=None,
                   help="directory for results.md, results.json and bench.log")
    args = p.parse_args(argv)
    if args.backend:
        jax.config.update("jax_platforms", args.backend)
    reps = args.reps or (2 if args.quick else 7)
    max_s = args.max_compile_s or (60.0 if args.quick else 120.0)
    split = lambda s: [t for t in s.split(",") if t]  # noqa: E731
    trees = split(args.trees if args.trees is not None else
                  ("small" if args.quick else ",".join(STEP_TREES)))
    many_trees = split(args.many_trees if args.many_trees is not None else
                       ("tiny_many" if args.quick else ",".join(MANY_TREES)))
    reg = entries()
    names = ([n for n in OPTCLIP if n in reg] if args.clippers == "all"
             else split(args.clippers))
    bad = [n for n in names if n not in reg or reg[n].kind != "optclip"]
    bad += [t for t in trees + many_trees if t not in TREES]
    if bad:
        p.error(f"unknown: {', '.join(bad)} (clippers: {', '.join(n for n in OPTCLIP if n in reg)};"
                f" trees: {', '.join(TREES)})")

    log = None
    stdout = sys.stdout
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        log = (out / "bench.log").open("w")
        sys.stdout = _Tee(stdout, log)
    try:
        t_start = time.perf_counter()
        meta = {"jax": jax.__version__, "optax": optax.__version__,
                "device": str(jax.devices()[0]), "platform": jax.devices()[0].platform,
                "machine": platform.machine(), "cpus": os.cpu_count(),
                "argv": list(sys.argv[1:] if argv is None else argv), "reps": reps,
                "warmup": args.warmup, "clippers": names, "commit": _commit(),
                "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}
        print(f"jax {meta['jax']}, optax {meta['optax']}, device {meta['device']}, "
              f"{meta['machine']}, {meta['cpus']} CPUs; clippers: {', '.join(names)}", flush=True)
        _warm_up()
        steps = args.steps or (1 if meta["platform"] == "cpu" else 20)
        meta["steps"] = steps
        first_reps = args.first_reps or (1 if args.quick else 3)
        step = [bench_step_tree(t, names, reps, args.warmup, args.max_live_gb, steps,
                                first_reps, args.backend) for t in trees]
        many_reps = args.many_reps or (1 if args.quick else 3)
        many = (bench_many(many_trees, names, max_s, args.backend, many_reps)
                if many_trees else None)
        rows = targets(step, many, names)
        meta["wall_s"] = time.perf_counter() - t_start
        md = markdown(step, many, rows, meta)
        print("\n" + md + f"\n\n(whole run: {meta['wall_s']:.0f} s)", flush=True)
        result = {"meta": meta, "step": step, "many": many, "targets": rows}
        if args.out:
            (out / "results.md").write_text(md + "\n")
            (out / "results.json").write_text(json.dumps(result, indent=1))
        return result
    finally:
        if log:
            sys.stdout = stdout
            log.close()


if __name__ == "__main__":
    main()
