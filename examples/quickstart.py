"""optclip in a few lines: clip, train, and read what the clipper did.

Run:  python examples/quickstart.py
"""

import jax
import jax.numpy as jnp
import optax

import optclip


def loss_fn(params, x, y):
    pred = jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]
    return jnp.mean((pred - y) ** 2)


def main(steps: int = 200) -> dict:
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (256, 8))
    y = 4.0 * jnp.sin(x @ jax.random.normal(k2, (8, 1)))
    params = {"w1": jax.random.normal(k3, (8, 32)) * 3.0, "b1": jnp.zeros(32),
              "w2": jnp.zeros((32, 1))}

    # Clip the global gradient norm to 1, then Adam. Any optclip clipper fits here.
    tx = optax.chain(optclip.clip_by_global_norm(1.0), optax.adam(1e-2))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    clipped_steps = 0
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state)
        s = optclip.stats(opt_state)  # what the clipper saw and did at this step
        clipped_steps += int(s["clipped"])
        if i % 40 == 0 or i == steps - 1:
            print(f"step {i:4d}  loss {float(loss):.4f}  grad_norm {float(s['grad_norm']):8.4f}  "
                  f"scale {float(s['scale']):.3f}  clipped {bool(s['clipped'])}")
    print(f"clipped on {clipped_steps} of {steps} steps")
    # Per-layer norms: the diagnostic for vanishing gradients, which clipping does not fix.
    grads = jax.grad(loss_fn)(params, x, y)
    print("per-leaf gradient norms:",
          {k: round(float(v), 6) for k, v in optclip.leaf_norms(grads).items()})
    return {"final_loss": float(loss), "clipped_steps": clipped_steps}


if __name__ == "__main__":
    main()
