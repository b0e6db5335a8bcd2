"""Size and single-device memory of the full umT5-XXL encoder forward, from abstract shapes only.

  .venv/bin/python -m scripts.bench_umt5 [--tokens 512] [--batch 1] [--dtype bfloat16]

Nothing is allocated: the parameters are ShapeDtypeStructs (nnx.eval_shape), and the jitted
forward (ids, mask [B, tokens] -> [B, tokens, 4096] float32, padding zeroed as in
hybrid_video/text.py) is lowered and compiled for the default device, whose
`memory_analysis()` is printed. Figures are per device (one device, no sharding).

On the CPU backend the bf16 temporaries are inflated: XLA:CPU has no bf16 GEMM and converts
the weights to float32 copies (visible as f32[4096, 10240] converts in the compiled HLO), so
compare with `--dtype float32`, whose temporaries are the real activation working set.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_video.nn.umt5 import UMT5Config, abstract_encoder, param_count

GIB = 2 ** 30


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=512)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--dtype", default="bfloat16", help="compute and parameter dtype")
  args = parser.parse_args()

  config = dataclasses.replace(UMT5Config(), dtype=args.dtype, param_dtype=args.dtype)
  graphdef, state = nnx.split(abstract_encoder(config))
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  tokens = jax.ShapeDtypeStruct((args.batch, args.tokens), jnp.int32)

  def forward(state, ids, mask):
    out = nnx.merge(graphdef, state)(ids, mask)
    return out * mask[..., None].astype(out.dtype)

  start = time.perf_counter()
  compiled = jax.jit(forward).lower(state, tokens, tokens).compile()
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); "
        f"config: {config}")
  print(f"parameters: {param_count(config):,} ({param_bytes / GIB:.2f} GiB in {args.dtype})")
  print(f"forward of {args.batch} x {args.tokens} tokens, compiled in {seconds:.1f} s:")
  for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
               "generated_code_size_in_bytes", "alias_size_in_bytes"):
    value = getattr(mem, name, None)
    if value is not None:
      print(f"  {name}: {value / GIB:.3f} GiB ({value:,} B)")
  if mem is not None:
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    print(f"  arguments + output + temporaries: {peak / GIB:.2f} GiB")


if __name__ == "__main__":
  main()
