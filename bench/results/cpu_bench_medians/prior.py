import sys, jax
from bench.clippers import entries
from bench.trees import TREES, abstract_tree
from bench.worker import compile_update
reg = entries(); tree = abstract_tree(TREES["many1000"]())
compile_update(reg["clip_by_global_norm"].alone(), abstract_tree(TREES["tiny"]()))
for name in sys.argv[1].split(","):
    jax.clear_caches()
    l, c, _ = compile_update(reg[name].alone(), tree)
    print(name, f"lower {l:.2f} compile {c:.2f} first {l+c:.2f}", flush=True)
