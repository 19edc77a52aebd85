"""Dumps a chain's compiled train step: XLA's optimized HLO, buffer assignment and memory
report, to find which values a temp buffer holds (how agc's GPU temporary was traced).

    python -m bench.dump_step agc gpt2 [--out DIR]
    python -m bench.dump_step clippy many1000 --alone   # the update alone (bench's many leaves)

Writes ``DIR/<chain>.<tree>/*after_optimizations*.txt`` (DIR defaults to ``dump``) and prints
the step's temp bytes. Chains and trees are those of ``python -m bench``.
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("chain")
    ap.add_argument("tree")
    ap.add_argument("--out", default="dump")
    ap.add_argument("--alone", action="store_true",
                    help="the clipper's update alone (updates and state donated), not chain + adam")
    args = ap.parse_args()
    where = os.path.abspath(os.path.join(args.out, f"{args.chain}.{args.tree}"))
    # before JAX starts: XLA reads its flags once
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={where}"
                               " --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_f").strip()
    import jax  # noqa: PLC0415

    from bench import clippers, trees  # noqa: PLC0415
    from bench.run import train_step  # noqa: PLC0415

    p = trees.abstract_tree(trees.TREES[args.tree]())
    if args.alone:
        from bench.worker import compile_update  # noqa: PLC0415

        lower_s, compile_s, temp = compile_update(clippers.entries()[args.chain].alone(), p)
        size = trees.tree_bytes(p)
        print(f"{args.chain}'s update alone on {args.tree}: trace + lower {lower_s:.2f} s, "
              f"compile {compile_s:.2f} s; temp {temp} bytes, {temp / size:.2f}x the gradients' "
              f"{size}; dump in {where}")
    else:
        tx = clippers.entries()[args.chain].chain()
        s = jax.eval_shape(tx.init, p)
        c = train_step(tx).lower(p, s, p).compile()
        print(f"{args.chain} on {args.tree}: temp {c.memory_analysis().temp_size_in_bytes} "
              f"bytes; dump in {where}")
    import shutil  # noqa: PLC0415

    for name in sorted(os.listdir(where)):
        path = os.path.join(where, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif not name.endswith(".txt") or "after_optimizations" not in name:
            os.remove(path)


if __name__ == "__main__":
    main()
