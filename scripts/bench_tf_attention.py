"""Compiled memory of the XLA teacher-forcing attention, dense vs blocked, at Wan-like shapes.

  .venv/bin/python -m scripts.bench_tf_attention [--chunks 2 7] [--tokens 4680] [--heads 12]
      [--head_dim 128] [--batch 1] [--dtypes float32 bfloat16] [--key_block 2048]

Per-device shapes of Wan2.1-1.3B (12 heads of 128) on fsdp=8 with batch 1 per device: heads
are not sharded, so one device holds all 12; a chunk is 3 latent frames of 30 x 52 patches
(L = 4680 tokens) and the paper's clip is 7 chunks. Each of the six inputs is [B, N L, H, D].

Nothing is allocated: the arguments are ShapeDtypeStructs, and `jax.jit(f).lower(...)
.compile().memory_analysis()` reports XLA's buffer assignment for the default device (CPU
here: an estimate of GPU / TPU memory, not a measurement). For each clip length and dtype it
prints the temporaries of the forward and of value_and_grad (w.r.t. all six inputs, of the
sum of both outputs) for the dense path (every chunk scores all N L clean keys at once, the
path below `key_block` tokens) and the blocked path (online softmax over `key_block`-key
blocks, flash-style custom VJP). XLA:CPU has no bf16 GEMM, so bf16 temporaries include f32
copies that a GPU or TPU would not make.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp

from kernels.local_attention import xla

GIB = 2**30
DENSE = 2**62  # a key block longer than any clip: the dense path


def compiled_memory(num_chunks, tokens, heads, head_dim, batch, dtype, key_block, grad):
  """(temporaries, arguments + outputs) in bytes of one compiled call, and compile seconds."""
  arg = jax.ShapeDtypeStruct((batch, num_chunks * tokens, heads, head_dim), dtype)
  attention = functools.partial(xla.teacher_forcing_attention, num_chunks=num_chunks,
                                key_block=key_block)
  fn = attention
  if grad:
    loss = lambda *a: sum(jnp.sum(o.astype(jnp.float32)) for o in attention(*a))
    fn = jax.value_and_grad(loss, argnums=tuple(range(6)))
  start = time.time()
  memory = jax.jit(fn).lower(*[arg] * 6).compile().memory_analysis()
  io = memory.argument_size_in_bytes + memory.output_size_in_bytes
  return memory.temp_size_in_bytes, io, time.time() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--chunks', type=int, nargs='+', default=[2, 7])
  parser.add_argument('--tokens', type=int, default=4680, help='L, tokens per chunk')
  parser.add_argument('--heads', type=int, default=12, help='heads per device')
  parser.add_argument('--head_dim', type=int, default=128)
  parser.add_argument('--batch', type=int, default=1, help='batch per device')
  parser.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'])
  parser.add_argument('--key_block', type=int, default=xla.TEACHER_FORCING_KEY_BLOCK)
  args = parser.parse_args()

  print(f'backend {jax.default_backend()}; per device: B={args.batch}, L={args.tokens}, '
        f'H={args.heads}, D={args.head_dim}; blocked key block {args.key_block}')
  print(f'{"dtype":>9} {"N":>2} {"pass":>14} {"dense temp":>12} {"blocked temp":>13} '
        f'{"ratio":>7} {"args+outs":>10}  compile s')
  for dtype in args.dtypes:
    for num_chunks in args.chunks:
      for grad in (False, True):
        shape = (num_chunks, args.tokens, args.heads, args.head_dim, args.batch,
                 jnp.dtype(dtype))
        dense, io, t_dense = compiled_memory(*shape, DENSE, grad)
        blocked, _, t_blocked = compiled_memory(*shape, args.key_block, grad)
        print(f'{dtype:>9} {num_chunks:>2} {"value_and_grad" if grad else "forward":>14} '
              f'{dense / GIB:>8.2f} GiB {blocked / GIB:>9.2f} GiB {dense / blocked:>6.1f}x '
              f'{io / GIB:>6.2f} GiB  {t_dense:.0f} / {t_blocked:.0f}', flush=True)


if __name__ == '__main__':
  main()
