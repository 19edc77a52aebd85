import sys, time, jax, gc
from bench import run as R
from bench.clippers import entries
from bench.trees import TREES, make_tree
reg = entries()
shapes = TREES["resnet50"]()
p = make_tree(shapes, seed=1, scale=0.1)
R._warm_up()
p_s = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), p)
order = sys.argv[1].split(",")
for r in range(int(sys.argv[2])):
    for k in order:
        tx = reg[k].chain(); s_s = jax.eval_shape(tx.init, p_s)
        jax.clear_caches()
        c, l, co = R.lower_and_compile(R.train_step(tx), p_s, s_s, p_s)
        print(r, k, f"{l+co:.2f} (lower {l:.2f})", flush=True)
