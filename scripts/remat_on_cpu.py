"""Does XLA:CPU's memory analysis honour rematerialisation? A 4-layer MLP's gradient with and
without jax.checkpoint per layer: compiled temporaries, and the recomputations and
optimization barriers before and after XLA's passes.

  .venv/bin/python -m scripts.remat_on_cpu

On this project's CPU (jax 0.10.2), with XLA:CPU's own pipeline, both give the same
temporaries (752 MiB): its `cse_barrier_expander` pass removes the optimization barriers that
jax.checkpoint inserts, and CSE then merges most recomputations back into the forward, so a
compiled training step sums every layer's activations whatever model.remat says. GPU and TPU
keep the barriers until scheduling. Compiled with that pass skipped (a per-executable
compiler option, hybrid_video/xla_analysis.compiler_options, which --mode=compile uses on CPU)
the barriers stay and remat takes effect (336 MiB).
"""

import jax
import jax.numpy as jnp

from hybrid_video.xla_analysis import compiler_options

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
    text = lowered.as_text()
    for name, options in (("XLA:CPU's pipeline", None),
                          ("--mode=compile's options", compiler_options("cpu"))):
      compiled = lowered.compile(compiler_options=options)
      hlo = compiled.as_text()
      print(f"remat={remat}, {name}: temporaries "
            f"{compiled.memory_analysis().temp_size_in_bytes / 2**20:.0f} MiB; tanh lowered "
            f"{text.count('stablehlo.tanh')} -> compiled {hlo.count(' tanh(')}; optimization "
            f"barriers lowered {text.count('optimization_barrier')} -> compiled "
            f"{hlo.count('opt-barrier')}")


if __name__ == "__main__":
  main()
