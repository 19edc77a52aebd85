"""The StableHLO that ``jax.export`` gives for cpu, cuda and tpu, for one optclip checkout.

    python bench/results/cpu_split_trace/exported.py CHECKOUT

A tree of small, large, scalar, zero-size and bfloat16 leaves; for each clipper and
platform list, an MD5 of the module text (locations stripped) and its length. Run it at two
checkouts and compare the lines: the same hash is the same program text. ``--text NAME
PLATFORM`` prints that module instead.
"""

import hashlib
import re
import sys
from pathlib import Path

CHECKOUT = str(Path(sys.argv[1]).resolve())
sys.path.insert(0, CHECKOUT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import export  # noqa: E402

import optclip  # noqa: E402

TREE = {"a": jnp.ones((3, 4, 5)), "b": jnp.ones((7,)), "c": jnp.ones((2, 3)),
        "d": jnp.ones((200, 300)), "e": jnp.ones(()), "f": jnp.ones((0, 3)),
        "g": jnp.ones((4, 4), jnp.bfloat16)}
TXS = {"agc": lambda: optclip.agc(0.01), "clippy": optclip.clippy,
       "clip_by_leaf_norm": lambda: optclip.clip_by_leaf_norm(1.0),
       "clip_by_block_rms": lambda: optclip.clip_by_block_rms(1.0), "adagc": optclip.adagc,
       "clip_by_global_norm": lambda: optclip.clip_by_global_norm(1.0)}


def module(name: str, platforms: list[str]) -> str:
    tx = TXS[name]()
    fn = jax.jit(lambda u, s, p: tx.update(u, s, p))
    text = export.export(fn, platforms=platforms)(TREE, tx.init(TREE), TREE).mlir_module()
    text = re.sub(r" loc\([^)]*\)", "", text)
    return re.sub(r"#loc\d*( = .*)?", "", text)


def main() -> None:
    assert optclip.__file__.startswith(CHECKOUT), optclip.__file__
    if sys.argv[2:3] == ["--text"]:
        print(module(sys.argv[3], sys.argv[4].split(",")))
        return
    for name in TXS:
        for platforms in (["cpu"], ["cuda"], ["tpu"], ["cpu", "cuda", "tpu"]):
            text = module(name, platforms)
            print(name, ",".join(platforms), hashlib.md5(text.encode()).hexdigest(), len(text))


if __name__ == "__main__":
    main()
