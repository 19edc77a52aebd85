"""Diagnostics behind docs/benchmarks.md's "why" notes on XLA:CPU (compile time, the
guards' copies).

    python -m bench.xla_probe kernels      distinct fused kernels and compile times
    python -m bench.xla_probe guard_copy   the guards' copy of the donated state, reduced
    python -m bench.xla_probe guard_cond   skip_nonfinite (a lax.cond) against a select, ResNet-50
    python -m bench.xla_probe value        clip_by_value: its reductions' costs, its NaN step
    python -m bench.xla_probe select       per-leaf values out of one vector: slices or selection
    python -m bench.xla_probe update_space min and max with a NaN; temps of update clipping
    python -m bench.xla_probe reduce_fusion  the element-wise ops XLA:CPU fuses into a min
    python -m bench.xla_probe written_out  per-leaf factors computed in every leaf's kernel
    python -m bench.xla_probe unit_rescue  per-unit rescued sums: which terms XLA writes out

``kernels``: XLA:CPU compiles each distinct fused kernel on its own and identical ones once.
It prints, for the global-norm and the per-leaf chain + adam on the GPT-2 tree, the
compile time and the number of fused computations (all, and distinct once names are set
aside); the compile time of slicing a 1,000-vector into 1,000 scalars; and, on GPT-2 and
1,000 mixed leaves, ``clip_by_leaf_norm``'s update against a leaf-by-leaf variant (each
leaf's norm, scale and clip computed on its own, the rescue's ``lax.cond`` returning one
norm per leaf), the design that docs/benchmarks.md says was tried.

``select``: compile times (lower + compile) of 1,000 per-leaf clips ``x * min(1, 1/||x||)``
on leaves of one shape and of 1,000 distinct shapes (identical kernels are compiled once);
and of 1,000 leaves of one shape each multiplied by its own value from one 1,000-vector,
taken by a slice at its offset (a distinct kernel per leaf), by a masked sum over a block of
32 rows (``_selected`` here: the same kernel for every leaf; what XLA:CPU took up to commit
93d58f9), and by a gather with constant indices (``norms._split_gathered``: the same kernel
for every leaf, with no reduction).

``update_space``: on XLA:CPU, ``jnp.min`` and ``jnp.max`` of float32 arrays holding one NaN
(at random places, 200 trials) against NumPy: how often the result is NaN, the min or max
of the other elements, or neither. Then the temp bytes, as a share of a two-leaf tree, of
update-space clipping after adam: Optax's ``clip_by_block_rms`` and ``clip_by_global_norm``,
optclip's ``clip_by_global_norm`` and ``clippy``, and the same step with two per-leaf
reductions of the update (a sum of squares and a min) where each alone is one reduction.

``reduce_fusion``: which element-wise operations XLA:CPU fuses into a reduction of Adam's
update. Adam, then each tensor multiplied by ``min(1, r)`` where ``r`` is a min reduction of
an element-wise expression of the update ``u`` and the weight ``w`` (as ``clippy``'s ratios
are), on a two-leaf tree: the temp bytes of the donated step, as a share of the tree. 1.00x
is Adam's update alone, written out once, the arithmetic on it fused into the reduction
that reads it; 2.00x or more, the reduction's operand written out as well.

``written_out``: compile time and optimized HLO size of 1,000 leaves each multiplied by its
own factor, taken by a gather (``norms._split_gathered``) from a vector that a chain of
cheap element-wise operations computes (as adagc's EMA and clip rule do): as it is, where
XLA fuses the whole chain into each leaf's gather kernel, and through
``norms._written_out`` (a ``lax.cond`` XLA does not fuse across) and through an
optimization barrier.

``unit_rescue``: temp bytes of the overflow rescue's rescaled sum of per-unit norms (AGC's
units: each output channel), ``sum((x * s) ** 2)`` over the reduced dims with ``s`` a power of
two per unit, inside a ``lax.cond`` as in ``norms.norm_core``, in several forms, on shapes of
ResNet-50 and GPT-2 leaves; then the temp bytes of the ``agc`` chain + adam (``python -m
bench``'s) on both trees with ``norms._scaled_terms`` replaced by each form. On an H200,
XLA:GPU wrote some of these products out (a loop fusion, then the reduction) rather than
fusing them into the reduction: the ``agc`` chain's temporary was 9% of ResNet-50.

``guard_copy``: temp bytes of a donated step ``p, mu -> p + u(mu'), mu'`` where the kept
state is ``where(skip, mu, mu')`` (as the guards did until they took the step inside a
``lax.cond``), against computing ``u`` from the kept state: the first copies ``mu`` on
XLA:CPU, the second does not.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import optclip
from bench import trees
from bench.compile_probe import fused_counts
from bench.run import Measured, _copy, temp_bytes, time_group, train_step
from optclip import norms as _n
from optclip.static import global_scale


def _compile(fn, *args) -> tuple[float, str]:
    low = jax.jit(fn).lower(*args) if not hasattr(fn, "lower") else fn.lower(*args)
    t0 = time.perf_counter()
    c = low.compile()
    return time.perf_counter() - t0, c.as_text()


def _leaf_by_leaf(g):
    """clip_by_leaf_norm(1.0), leaf by leaf (L2, no stats beyond the global norms)."""
    xs = jax.tree.leaves(g)
    sums = [jnp.sum(x * x) for x in xs]
    s = jnp.stack(sums)
    need = jnp.any(~jnp.isfinite(s) | (s < 1e-30))

    def rescue():
        out = []
        for x in xs:
            m = jnp.max(jnp.abs(x))
            down, up = _n._pow2_scale(m)
            out.append(jnp.where(m == 0, 0.0, jnp.sqrt(jnp.sum((x * down) ** 2)) * up))
        return out

    norms = lax.cond(need, rescue, lambda: [jnp.sqrt(v) for v in sums])
    one = jnp.ones((), jnp.float32)
    out = [x * global_scale(n, one) for x, n in zip(xs, norms, strict=True)]
    nv = jnp.stack(norms)
    return out, _n.combine_norms(nv, 2.0), _n.combine_norms(nv * global_scale(nv, one), 2.0)


def kernels() -> None:
    gpt2 = trees.abstract_tree(trees.TREES["gpt2"]())
    for name, tx in (("clip_by_global_norm", optclip.clip_by_global_norm(1.0)),
                     ("clip_by_leaf_norm", optclip.clip_by_leaf_norm(1.0))):
        chain = optax.chain(tx, optax.adam(1e-3))
        s = jax.eval_shape(chain.init, gpt2)
        secs, hlo = _compile(train_step(chain), gpt2, s, gpt2)
        n, d = fused_counts(hlo, ("%fused",))
        print(f"gpt2 {name} + adam: compile {secs:.2f} s, fused computations {n}, "
              f"distinct {d}", flush=True)
    v = jax.ShapeDtypeStruct((1000,), jnp.float32)
    secs, _ = _compile(lambda v: [v[i] for i in range(1000)], v)
    print(f"1,000 scalar slices of one vector: compile {secs:.2f} s", flush=True)
    for tname in ("gpt2", "many1000"):
        tree = trees.abstract_tree(trees.TREES[tname]())
        tx = optclip.clip_by_leaf_norm(1.0)
        st = tx.init(None)
        a, _ = _compile(lambda g, tx=tx, st=st: tx.update(g, st), tree)
        b, _ = _compile(_leaf_by_leaf, tree)
        print(f"{tname} update alone: clip_by_leaf_norm {a:.2f} s, leaf by leaf {b:.2f} s",
              flush=True)


def guard_copy() -> dict[str, float]:
    """Prints and returns each variant's temp bytes over the state's."""
    n = 1 << 20
    a = jax.ShapeDtypeStruct((n,), jnp.float32)

    def as_guards(p, mu, g):
        skip = ~jnp.isfinite(jnp.sum(g))
        new = 0.9 * mu + 0.1 * g
        return p + jnp.where(skip, 0.0, -0.01 * new), jnp.where(skip, mu, new)

    def from_kept(p, mu, g):
        skip = ~jnp.isfinite(jnp.sum(g))
        kept = jnp.where(skip, mu, 0.9 * mu + 0.1 * g)
        return p + jnp.where(skip, 0.0, -0.01 * kept), kept

    out = {}
    for f in (as_guards, from_kept):
        c = jax.jit(f, donate_argnums=(0, 1)).lower(a, a, a).compile()
        out[f.__name__] = c.memory_analysis().temp_size_in_bytes / (4 * n)
        print(f"{f.__name__}: temp {out[f.__name__]:.2f}x the state", flush=True)
    return out


def guard_cond() -> None:
    """skip_nonfinite(adam) as shipped (``lax.cond(finite, take the step, skip)``, as
    ``optax.apply_if_finite`` orders its branches) against the same guard written as a select
    between the old and the new state (as it was until the cond), against the cond with its
    branches the other way round, and against ``apply_if_finite``: temp bytes and step time
    on ResNet-50."""
    import statistics  # noqa: PLC0415

    from optclip import guards  # noqa: PLC0415

    def other_guard(inner, form):
        base = optclip.skip_nonfinite(inner)

        def update(updates, state, params=None):
            norm, bad = guards.norm_and_nonfinite(updates, (), None, None)

            def take():
                return inner.update(updates, state.inner_state, params)

            def skip():
                return jax.tree.map(jnp.zeros_like, updates), state.inner_state

            if form == "select":
                new_u, new_s = take()
                out = jax.tree.map(lambda u: jnp.where(bad, jnp.zeros_like(u), u), new_u)
                inner_state = jax.tree.map(lambda n, o: jnp.where(bad, o, n), new_s,
                                           state.inner_state)
            else:  # "skip first"
                out, inner_state = lax.cond(bad, skip, take)
            stats = state.stats.advance(grad_norm=norm, threshold=state.stats.threshold,
                                        skipped=bad, nonfinite=bad)
            return out, guards.SkipNonfiniteState(inner_state=inner_state, stats=stats)

        return optax.GradientTransformation(base.init, update)

    shapes = trees.TREES["resnet50"]()
    params, grads = trees.make_tree(shapes, 1, 0.1), trees.make_tree(shapes, 0)
    size = trees.tree_bytes(params)
    p_s = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    adam = lambda: optax.adam(1e-3)  # noqa: E731
    txs = {"global-norm chain": optax.chain(optclip.clip_by_global_norm(1.0), adam()),
           "skip_nonfinite (cond, step first)": optclip.skip_nonfinite(adam()),
           "select (before)": other_guard(adam(), "select"),
           "cond, skip first": other_guard(adam(), "skip first"),
           "optax.apply_if_finite": optax.apply_if_finite(adam(), 10**9)}
    ms = []
    for n, tx in txs.items():
        c = train_step(tx).lower(p_s, jax.eval_shape(tx.init, p_s), p_s).compile()
        print(f"{n}: temp {temp_bytes(c) / size:.0%} of the tree", flush=True)
        ms.append(Measured(n, c, lambda tx=tx: (_copy(params), tx.init(params)), (grads,)))
    names = [m.key for m in ms]
    times = time_group(ms, reps=7, warmup=1)
    base = statistics.median(times[names[0]])
    for n in names:
        print(f"{n}: {statistics.median(times[n]) / base:.2f}x the global-norm chain",
              flush=True)


def value() -> None:
    """clip_by_value's floor on XLA:CPU and the price of its non-finite step.

    On 32M float32 elements: the time of each reduction its stats need (the norm, a plain
    sum of squares; the largest magnitude, for ``clipped``; the norm after the clamp) and of
    the three in one variadic ``lax.reduce`` over rows; and of ways to have the norm and an
    exact count of the clamped elements in one read (a float sum of the mask; the two sums
    in one jit, as one complex sum, or stacked). Then ``chain(clip_by_value(0.1),
    adam)`` on the GPT-2 tree, a finite step against one with a NaN (the sliced flag)."""
    import statistics  # noqa: PLC0415

    x = jax.random.normal(jax.random.key(0), (1 << 25,), jnp.float32)
    h = jnp.float32(0.1)

    def three_in_one(x, h):
        rows = x.reshape(-1, 1024)
        a = jnp.abs(rows)
        m = jnp.minimum(a, h)
        r = lax.reduce((rows * rows, m * m, a), (jnp.float32(0),) * 3,
                       lambda u, v: (u[0] + v[0], u[1] + v[1], jnp.maximum(u[2], v[2])), (1,))
        return jnp.sum(r[0]), jnp.sum(r[1]), jnp.max(r[2])

    fns = {"sum of squares (the norm)": lambda x, h: jnp.sum(x * x),
           "max |x| (clipped)": lambda x, h: jnp.max(jnp.abs(x)),
           "sum min(|x|, h)^2 (the norm after)": lambda x, h: jnp.sum(
               jnp.square(jnp.minimum(jnp.abs(x), h))),
           "the three, one variadic reduce over rows": three_in_one,
           # ways to have the norm and an exact clamp count (or flag) from one read
           "count of |x| > h (a float sum of the mask)": lambda x, h: jnp.sum(
               jnp.abs(x) > h, dtype=jnp.float32),
           "sum of squares and that count, one jit": lambda x, h: (
               jnp.sum(x * x), jnp.sum(jnp.abs(x) > h, dtype=jnp.float32)),
           "the two as one complex sum": lambda x, h: jnp.sum(lax.complex(
               x * x, (jnp.abs(x) > h).astype(jnp.float32))),
           "the two stacked, summed along the elements": lambda x, h: jnp.sum(jnp.stack(
               [x * x, (jnp.abs(x) > h).astype(jnp.float32)], -1), 0)}
    for n, f in fns.items():
        f = jax.jit(f)
        jax.block_until_ready(f(x, h))
        ts = []
        for _ in range(9):
            t0 = time.perf_counter()
            jax.block_until_ready(f(x, h))
            ts.append(time.perf_counter() - t0)
        print(f"32M floats, {n}: {1e3 * statistics.median(ts):.1f} ms", flush=True)
    del x

    shapes = trees.TREES["gpt2"]()
    params, grads = trees.make_tree(shapes, 1), trees.make_tree(shapes, 0)
    leaves, treedef = jax.tree.flatten(grads)
    bad = jax.tree.unflatten(treedef, [leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)]
                             + leaves[1:])
    tx = optax.chain(optclip.clip_by_value(0.1), optax.adam(1e-3))
    c = train_step(tx).lower(params, tx.init(params), grads).compile()
    ms = [Measured(n, c, lambda: (_copy(params), tx.init(params)), (g,))
          for n, g in (("finite step", grads), ("step with a NaN", bad))]
    times = time_group(ms, reps=7, warmup=1)
    t = {n: statistics.median(v) for n, v in times.items()}
    print(f"GPT-2, chain(clip_by_value(0.1), adam): finite {1e3 * t['finite step']:.0f} ms, "
          f"with a NaN {1e3 * t['step with a NaN']:.0f} ms "
          f"({t['step with a NaN'] / t['finite step']:.1f}x)", flush=True)


def _selected(flat: jax.Array, lay: _n.Layout) -> list[jax.Array]:
    """Each array's one unit by a sum over a ``where`` with a constant one-hot mask, from a
    block of 32 rows of the flat vector (one slice per block): optclip's split on XLA:CPU
    up to commit 93d58f9, for arrays with one unit each."""
    rows = 32
    n = len(lay.offsets)
    n_blocks = -(-n // rows)
    mat = jnp.pad(flat[:n].reshape(n, 1), ((0, n_blocks * rows - n), (0, 0)))
    blocks = [mat[b * rows:(b + 1) * rows] for b in range(n_blocks)]
    out = []
    for pos in range(n):
        b, r = divmod(pos, rows)
        mask = np.zeros((rows, 1), bool)
        mask[r] = True
        out.append(jnp.sum(jnp.where(mask, blocks[b], 0.0), axis=0).reshape(lay.shapes[pos]))
    return out


def select() -> None:
    def first_call(fn, *args) -> float:
        t0 = time.perf_counter()
        jax.jit(fn).lower(*args).compile()
        return time.perf_counter() - t0

    first_call(lambda x: x * 2, jax.ShapeDtypeStruct((3,), jnp.float32))  # warm-up
    same = [jax.ShapeDtypeStruct((64,), jnp.float32)] * 1000
    distinct = [jax.ShapeDtypeStruct((64 + i,), jnp.float32) for i in range(1000)]

    def clip(xs):
        return [x * jnp.minimum(1.0, 1.0 / jnp.sqrt(jnp.sum(x * x))) for x in xs]

    for name, xs in (("one shape", same), ("1,000 distinct shapes", distinct)):
        print(f"1,000 per-leaf clips, {name}: {first_call(clip, xs):.2f} s", flush=True)
    v = jax.ShapeDtypeStruct((1000,), jnp.float32)
    lay = _n.layout_of(same, [None] * 1000)
    for name, split in (("a slice each", _n._split_sliced),
                        ("selection by mask (up to 93d58f9)", _selected),
                        ("gather (norms._split_gathered)", _n._split_gathered)):
        secs = first_call(lambda v, xs, split=split: [
            x * s for x, s in zip(xs, split(v, lay), strict=True)], v, same)
        print(f"1,000 leaves times their value from one vector, {name}: {secs:.2f} s",
              flush=True)


def update_space() -> None:
    rng = np.random.default_rng(0)
    for n in (16, 4096, 1 << 19):
        mn, mx = jax.jit(jnp.min), jax.jit(jnp.max)
        tally = {"min": [0, 0, 0], "max": [0, 0, 0]}  # NaN, the others' extreme, neither
        for _ in range(200):
            x = rng.uniform(1, 2, n).astype(np.float32)
            x[rng.integers(n)] = np.nan
            for name, f, ref in (("min", mn, np.nanmin), ("max", mx, np.nanmax)):
                got = float(f(x))
                k = 0 if np.isnan(got) else 1 if got == float(ref(x)) else 2
                tally[name][k] += 1
        for name, (nan, other, neither) in tally.items():
            print(f"jnp.{name} of {n:,} float32 with one NaN, 200 trials: NaN {nan}, the "
                  f"others' {name} {other}, neither {neither}", flush=True)

    p = {"a": jnp.ones((512, 1024)), "b": jnp.ones((1024, 512))}
    size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(p))

    def two_reductions() -> optax.GradientTransformation:
        def update(u, s, params):
            lr, la = s  # traced: a constant bound is broadcast in full as the min's operand
            def leaf(x, w):
                r = jnp.min((lr * jnp.abs(w) + la) / jnp.abs(x))
                return x * jnp.minimum(1, r) / jnp.maximum(1, jnp.sqrt(jnp.sum(x * x)))
            return jax.tree.map(leaf, u, params), s
        return optax.GradientTransformation(
            lambda _: (jnp.float32(0.1), jnp.float32(1e-7)), update)

    for name, tx in (("optax.clip_by_block_rms(1.0)", optax.clip_by_block_rms(1.0)),
                     ("optax.clip_by_global_norm(1.0)", optax.clip_by_global_norm(1.0)),
                     ("optclip.clip_by_global_norm(1.0)", optclip.clip_by_global_norm(1.0)),
                     ("optclip.clippy(0.1, 1e-7)", optclip.clippy(0.1, 1e-7)),
                     ("a sum of squares and a min per leaf", two_reductions())):
        chain = optax.chain(optax.adam(1e-3), tx)
        temp = temp_bytes(train_step(chain).lower(p, chain.init(p), p).compile())
        print(f"adam, then {name}: temp {temp / size:.2f}x the tree", flush=True)


def written_out() -> None:
    n = 1000
    xs = [jnp.ones((32,)) for _ in range(n)]
    v, count = jnp.arange(n, dtype=jnp.float32), jnp.int32(3)
    lay = _n.layout_of(xs, [None] * n)

    def factors(v, count):
        y = v
        for k in range(12):
            y = jnp.where(y > k, y * 1.01 + 0.5, jnp.sqrt(jnp.abs(y)))
        return jnp.where(count < 100, y, 1.0)

    ways = {"as it is": lambda f: f, "norms._written_out": _n._written_out,
            "an optimization barrier": lax.optimization_barrier}
    for name, way in ways.items():
        def fn(v, xs, count, way=way):
            return [x * s for x, s in
                    zip(xs, _n._split_gathered(way(factors(v, count)), lay), strict=True)]
        secs, text = _compile(fn, v, xs, count)
        print(f"1,000 leaves times their factor, {name}: compile {secs:.2f} s, optimized HLO "
              f"{len(text) / 1e6:.1f} MB", flush=True)


def _terms_forms() -> dict:
    """Forms of ``norms._scaled_terms`` for p = 2 (``v * s`` squared, ``s`` a power of two)."""
    def cur(v, s):
        v, s = lax.optimization_barrier((v, s))
        t = v * s
        return t * t

    def no_barrier(v, s):
        t = v * s
        return t * t

    def barrier_s(v, s):
        s = lax.optimization_barrier(s)
        t = v * s
        return t * t

    def divide(v, s):
        v, r = lax.optimization_barrier((v, 1 / s))
        t = v / r
        return t * t

    return {"as shipped": cur, "no barrier": no_barrier, "barrier on s": barrier_s,
            "divide by 1/s": divide}


def unit_rescue() -> None:
    shapes = {"(2048, 1000)": ((2048, 1000), (0,)), "(3072, 768)": ((3072, 768), (0,)),
              "(768, 768)": ((768, 768), (0,)), "(3, 3, 256, 256)": ((3, 3, 256, 256), (0, 1, 2)),
              "(1, 1, 1024, 256)": ((1, 1, 1024, 256), (0, 1, 2)),
              "(3, 3, 512, 512)": ((3, 3, 512, 512), (0, 1, 2))}
    forms = _terms_forms()

    def split(v, s):
        # two stages: the reduced dims as (a, b) rows, b summed first
        units = v.shape[-1]
        rows = v.size // units
        a = next(d for d in range(int(rows ** 0.5), 0, -1) if rows % d == 0)
        v, s = lax.optimization_barrier((v.reshape(a, rows // a, units), s.reshape(1, 1, units)))
        t = v * s
        return jnp.sum(jnp.sum(t * t, axis=1), axis=0)

    print(f"backend {jax.default_backend()}; temp bytes / the array's bytes, in a lax.cond",
          flush=True)
    for name, (shape, red) in shapes.items():
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        sv = jax.ShapeDtypeStruct((shape[-1],), jnp.float32)
        out = []
        for fname, form in list(forms.items()) + [("two-stage sum", None)]:
            def f(pred, x, sv, form=form, red=red):
                def rescued():
                    s = sv.reshape((1,) * (x.ndim - 1) + (-1,))
                    if form is None:
                        return split(x, s)
                    return jnp.sum(form(x, s), axis=red).reshape(-1)
                return lax.cond(pred, rescued, lambda: jnp.zeros((x.shape[-1],), x.dtype))
            c = jax.jit(f).lower(jax.ShapeDtypeStruct((), bool), x, sv).compile()
            share = c.memory_analysis().temp_size_in_bytes / (4 * np.prod(shape))
            out.append(f"{fname} {share:.2f}")
        print(f"  {name}: " + ", ".join(out), flush=True)

    from bench.clippers import entries  # noqa: PLC0415

    def two_stage(red):
        """``red`` (a sum) over leading dims of many rows, as two sums."""
        def r(x, axis=None, keepdims=False):
            lead = isinstance(axis, tuple) and axis == tuple(range(len(axis))) \
                and len(axis) < x.ndim
            rows = int(np.prod(x.shape[:len(axis)])) if lead else 0
            if red is not jnp.sum or rows < 1024:
                return red(x, axis=axis, keepdims=keepdims)
            a = next(d for d in range(int(rows ** 0.5), 0, -1) if rows % d == 0)
            y = jnp.sum(jnp.sum(x.reshape((a, rows // a) + x.shape[len(axis):]), axis=1), axis=0)
            return y.reshape((1,) * len(axis) + y.shape) if keepdims else y
        return r

    print("agc chain + adam, temp bytes / tree, with norms._scaled_terms in each form",
          flush=True)
    shipped, shipped_reduce = _n._scaled_terms, _n._reduce_packed
    try:
        for fname, form in list(forms.items()) + [("as shipped, two-stage sum", None)]:
            if form is None:
                _n._scaled_terms = shipped
                _n._reduce_packed = lambda pk, sc, term, red, *a: shipped_reduce(
                    pk, sc, term, two_stage(red) if sc is not None else red, *a)
            else:
                _n._scaled_terms = lambda v, s, p, form=form: form(v, s) if p == 2 else \
                    shipped(v, s, p)
            row = []
            for tree_name in ("resnet50", "gpt2"):
                tx = entries()["agc"].chain()
                pt = trees.abstract_tree(trees.TREES[tree_name]())
                c = train_step(tx).lower(pt, jax.eval_shape(tx.init, pt), pt).compile()
                size = sum(4 * int(np.prod(v.shape)) for v in jax.tree.leaves(pt))
                row.append(f"{tree_name} {100 * temp_bytes(c) / size:.2f}%")
            print(f"  {fname}: " + ", ".join(row), flush=True)
    finally:
        _n._scaled_terms, _n._reduce_packed = shipped, shipped_reduce


def reduce_fusion() -> None:
    p = {"a": jax.ShapeDtypeStruct((512, 1024), jnp.float32),
         "b": jax.ShapeDtypeStruct((1024, 512), jnp.float32)}
    size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(p))

    def bound(w, lr, la):
        return lr * jnp.abs(w) + la

    forms = {
        "b / |u| (arithmetic only)": lambda u, w, lr, la: bound(w, lr, la) / jnp.abs(u),
        "max(b / |u|, 0)": lambda u, w, lr, la: jnp.maximum(bound(w, lr, la) / jnp.abs(u), 0),
        "b / min(|u|, 3e38)": lambda u, w, lr, la: bound(w, lr, la) / jnp.minimum(
            jnp.abs(u), 3e38),
        "sqrt(b / |u|)": lambda u, w, lr, la: jnp.sqrt(bound(w, lr, la) / jnp.abs(u)),
        "(b / |u|) ** 2": lambda u, w, lr, la: (bound(w, lr, la) / jnp.abs(u)) ** 2,
        "b with 0 * inf = 0 (a select)": lambda u, w, lr, la: (
            jnp.where((w == 0) | (lr == 0), 0.0, jnp.abs(w) * lr) + la) / jnp.abs(u),
        "where(|u| > 0, b / |u|, inf)": lambda u, w, lr, la: jnp.where(
            jnp.abs(u) > 0, bound(w, lr, la) / jnp.abs(u), jnp.inf),
        "b / where(|u| > 0, |u|, 1)": lambda u, w, lr, la: bound(w, lr, la) / jnp.where(
            jnp.abs(u) > 0, jnp.abs(u), 1.0),
        "b / |u| + isfinite(u) (an is-finite test, converted)": lambda u, w, lr, la: (
            bound(w, lr, la) / jnp.abs(u) + jnp.isfinite(u).astype(jnp.float32)),
        "bitcast to int32 (min of the bits)": lambda u, w, lr, la: lax.bitcast_convert_type(
            bound(w, lr, la) / jnp.abs(u), jnp.int32),
        "clippy's masked ratios (optclip.clippy._ratios)": None,
    }
    import importlib
    clippy_mod = importlib.import_module("optclip.clippy")

    def tx_of(form) -> optax.GradientTransformation:
        def update(u, s, params):
            lr, la = s  # traced: a constant bound is broadcast in full as the min's operand

            def leaf(x, w):
                if form is None:
                    e = clippy_mod._ratios(x, w, lr, la, jnp.float32)
                else:
                    e = form(x, w, lr, la)
                r = jnp.min(e)
                if r.dtype != jnp.float32:
                    r = lax.bitcast_convert_type(r, jnp.float32)
                return x * jnp.minimum(1, r)
            return jax.tree.map(leaf, u, params), s
        return optax.GradientTransformation(
            lambda _: (jnp.float32(0.1), jnp.float32(1e-7)), update)

    for name, form in forms.items():
        chain = optax.chain(optax.adam(1e-3), tx_of(form))
        temp = temp_bytes(train_step(chain).lower(p, chain.init(p), p).compile())
        print(f"adam, then a min of {name}: temp {temp / size:.2f}x the tree", flush=True)


if __name__ == "__main__":
    {"kernels": kernels, "guard_copy": guard_copy, "guard_cond": guard_cond, "value": value,
     "select": select, "update_space": update_space, "written_out": written_out,
     "unit_rescue": unit_rescue, "reduce_fusion": reduce_fusion}[
        sys.argv[1] if len(sys.argv) > 1 else "kernels"]()
