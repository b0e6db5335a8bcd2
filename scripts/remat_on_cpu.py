"""Does XLA:CPU's memory analysis honour rematerialisation? A 4-layer MLP's gradient with and
without jax.checkpoint per layer: compiled temporaries, and the recomputations and
optimization barriers before and after XLA's passes.

  .venv/bin/python -m scripts.remat_on_cpu

On this project's CPU (jax 0.10.2) both give the same temporaries: XLA:CPU removes the
optimization barriers that jax.checkpoint inserts and merges (CSE) most recomputations back
into the forward, so compiled training steps on CPU sum every layer's activations whatever
model.remat says. Their --mode=compile figures are then upper bounds; GPU and TPU keep the
barriers until scheduling.
"""

import jax
import jax.numpy as jnp

T, D, F, LAYERS = 8192, 512, 4096, 4


def layer(x, w1, w2):
  return x + jnp.tanh(jnp.tanh(x @ w1) @ w2)  # hidden [T, F]: 128 MiB in fp32


def main():
  ws = [(jax.ShapeDtypeStruct((D, F), jnp.float32),
         jax.ShapeDtypeStruct((F, D), jnp.float32))] * LAYERS
  x = jax.ShapeDtypeStruct((T, D), jnp.float32)
  for remat in (False, True):
    f = jax.checkpoint(layer) if remat else layer

    def loss(ws, x):
      for w1, w2 in ws:
        x = f(x, w1, w2)
      return jnp.sum(x)

    lowered = jax.jit(jax.grad(loss)).lower(ws, x)
    compiled = lowered.compile()
    text, hlo = lowered.as_text(), compiled.as_text()
    print(f"remat={remat}: temporaries {compiled.memory_analysis().temp_size_in_bytes / 2**20:.0f}"
          f" MiB; tanh lowered {text.count('stablehlo.tanh')} -> compiled {hlo.count(' tanh(')};"
          f" optimization barriers lowered {text.count('optimization_barrier')} -> compiled "
          f"{hlo.count('opt-barrier')}")


if __name__ == "__main__":
  main()
