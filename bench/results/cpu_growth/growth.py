"""How the first call of an update grows with the number of small leaves, on XLA:CPU: the
bench's growth exponents from medians of fresh processes rather than one first call each.

For 1,000, 2,000 and 5,000 leaves (the bench's many-leaves trees), each form is traced,
lowered and compiled in a fresh process, ``--reps`` times, in rotation; the medians and the
growth exponent k of t ~ leaves^k (from the first and the last tree, as the bench takes it).
Forms: the updates of ``optax.clip(0.1)`` (element-wise only), ``clip_by_global_norm(1.0)``,
``skip_nonfinite(optax.identity())`` and ``clippy(0.1, 1e-7)`` (with the leaves as params);
and, not run by default, ``reduce_each``, the sum of every leaf added up (one reduction per
leaf), and ``select_each``, that sum's finiteness and every leaf or zeros by it (a guard's
work without its state), naive forms that do not concatenate the small leaves as the
clippers do (``--forms reduce_each,select_each``; not in ``growth.log``); ``cond_each``, the
same sum's finiteness choosing, by a ``lax.cond``, every leaf or zeros (a guard's work as the
guards take it, without their state), and ``apply_if_finite``, Optax's guard around
``optax.identity()`` (``--forms clip_by_global_norm,skip_nonfinite,cond_each,apply_if_finite``,
``growth_cond.log``: stopped in its second round, the last two forms taking minutes on 5,000
leaves).

``--donate`` jits with the updates and the state donated, as ``python -m bench``'s many-leaves
table does (``bench.worker.compile_update``); without it nothing is donated, as in the logs
above. Forms added with it (each runs with or without it): ``cond_scale``, a bare
``lax.cond`` over the tree, choosing every leaf times 2 or zeros by the finiteness of the
first leaf (one small reduction: the cond alone);
``scale``: every leaf times 2, no cond; ``skip_scale``: ``skip_nonfinite(optax.scale(2.0))``,
a guard whose step computes (around ``optax.identity()`` the step hands its operands back
unchanged) (``--donate --forms clip_by_global_norm,skip_nonfinite,skip_scale,cond_scale,scale``,
``growth_donated.log``, and the same without ``--donate`` in ``growth_kept.log``).
``step:clip_by_global_norm`` and ``step:skip_nonfinite``: the train step a user compiles,
``optax.chain(clip_by_global_norm(1.0), adam)`` or ``skip_nonfinite(adam)``, with the params
and the state donated and the gradients not, whatever ``--donate`` says (``python -m
bench``'s step trees' step; the state built by ``jax.eval_shape`` before the clock starts, as
``bench.worker.compile_chain`` builds it; ``growth_step.log``).
``--one FORM N --copies [--donate]`` prints the compiled program's copy instructions
(``copies.log``).

Run: PYTHONPATH=. python bench/results/cpu_growth/growth.py [--reps 3] [--forms a,b] [--donate]
"""
import argparse
import json
import math
import statistics
import subprocess
import sys
import time

FORMS = ["optax.clip", "clip_by_global_norm", "skip_nonfinite", "clippy"]
SIZES = [1000, 2000, 5000]


def one(form: str, n: int, donate: bool = False, copies: bool = False) -> float:
    """Seconds to trace, lower and compile ``form``'s update on ``n`` leaves (with
    ``copies``: the number of copy instructions in the compiled program instead)."""
    import jax
    import jax.numpy as jnp
    import optax

    import optclip
    from bench.trees import TREES, make_tree

    tree = make_tree(TREES[f"many{n}"](), seed=0)

    def total(g):
        return sum(jnp.sum(x) for x in jax.tree.leaves(g))

    if form == "reduce_each":
        fn, args = total, (tree,)
    elif form == "select_each":
        def fn(g):
            ok = jnp.isfinite(total(g))
            return jax.tree.map(lambda x: jnp.where(ok, x, jnp.zeros_like(x)), g)
        args = (tree,)
    elif form == "cond_scale":
        def fn(g):
            ok = jnp.isfinite(jnp.sum(jax.tree.leaves(g)[0]))
            return jax.lax.cond(ok, lambda t: jax.tree.map(lambda x: x * 2, t),
                                lambda t: jax.tree.map(jnp.zeros_like, t), g)
        args = (tree,)
    elif form == "scale":
        def fn(g):
            return jax.tree.map(lambda x: x * 2, g)
        args = (tree,)
    elif form == "cond_each":
        def fn(g):
            ok = jnp.isfinite(total(g))
            return jax.lax.cond(ok, lambda t: t, lambda t: jax.tree.map(jnp.zeros_like, t), g)
        args = (tree,)
    elif form.startswith("step:"):
        # the train step a user compiles: ``optax.chain(clipper, adam)``, or the guard around
        # adam, with the params and the state donated (``bench.run.train_step``), the
        # gradients an argument that is not donated
        from bench.run import train_step
        make = {"clip_by_global_norm": lambda: optax.chain(optclip.clip_by_global_norm(1.0),
                                                           optax.adam(1e-3)),
                "skip_nonfinite": lambda: optclip.skip_nonfinite(optax.adam(1e-3))}
        tx = make[form[len("step:"):]]()
        state = jax.eval_shape(tx.init, tree)  # (not timed, as the bench's worker)
        t0 = time.perf_counter()
        compiled = train_step(tx).lower(tree, state, tree).compile()
        return (compiled.as_text().count(" copy(") if copies
                else time.perf_counter() - t0)
    else:
        tx = {"optax.clip": lambda: optax.clip(0.1),
              "clip_by_global_norm": lambda: optclip.clip_by_global_norm(1.0),
              "skip_nonfinite": lambda: optclip.skip_nonfinite(optax.identity()),
              "skip_scale": lambda: optclip.skip_nonfinite(optax.scale(2.0)),
              "clippy": lambda: optclip.clippy(0.1, 1e-7),
              "apply_if_finite": lambda: optax.apply_if_finite(optax.identity(), 10**9),
              }[form]()
        fn, args = tx.update, (tree, tx.init(tree), tree)
    t0 = time.perf_counter()
    # (the updates and the state: the first two arguments, or the one)
    donated = tuple(range(min(2, len(args)))) if donate else ()
    compiled = jax.jit(fn, donate_argnums=donated).lower(*args).compile()
    if copies:
        return compiled.as_text().count(" copy(")
    return time.perf_counter() - t0


def fit_k(ns, ts):
    """As ``bench.run.growth_exponent``: the slope between the first and the last tree."""
    return math.log(ts[-1] / ts[0]) / math.log(ns[-1] / ns[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--one", nargs=2)
    ap.add_argument("--copies", action="store_true",
                    help="with --one: the compiled program's copy instructions, not seconds")
    ap.add_argument("--donate", action="store_true",
                    help="donate the updates and the state, as python -m bench does")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.donate, args.copies)))
        return
    forms = args.forms.split(",")
    times = {(f, n): [] for f in forms for n in SIZES}
    for r in range(args.reps):
        for n in SIZES:
            for f in forms[r % len(forms):] + forms[:r % len(forms)]:
                out = subprocess.run([sys.executable, __file__, "--one", f, str(n)]
                                     + (["--donate"] if args.donate else []),
                                     capture_output=True, text=True, check=True)
                times[f, n].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"  round {r + 1}: {f:20s} {n:5d} leaves {times[f, n][-1]:7.2f} s",
                      flush=True)
    print("\n| form | " + " | ".join(f"{n} leaves" for n in SIZES) + " | k |")
    print("|---|" + "---:|" * (len(SIZES) + 1))
    for f in forms:
        med = [statistics.median(times[f, n]) for n in SIZES]
        print(f"| {f} | " + " | ".join(f"{t:.2f} s" for t in med) + f" | {fit_k(SIZES, med):.2f} |")


if __name__ == "__main__":
    main()
