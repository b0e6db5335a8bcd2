"""Ahead-of-time lowering of the Pallas kernels for GPU (Triton) and TPU (Mosaic), on CPU.

No accelerator is needed: `lower(lowering_platforms=...)` runs the Pallas -> Triton IR and
Pallas -> Mosaic lowerings, so a primitive without a lowering rule, a bad block shape or a
dtype the backend rejects fails here. It does not compile (Triton -> PTX, Mosaic layout
passes) or run the kernels: that still needs the device (the `gpu`-marked tests).
"""

import contextlib

import jax
import jax.numpy as jnp
import pytest

from kernels.gated_delta import pallas_gated_delta
from kernels.local_attention import pallas_attention

B, N, L, H, D = 1, 2, 40, 2, 128  # L = 40: padded to the 32-token blocks; head dim as paper
S = jax.ShapeDtypeStruct
PLATFORMS = {'cuda': ('gpu', 'triton'), 'tpu': ('tpu', 'tpu_custom_call')}


def _abstract_gpu():
  """jax >= 0.11 asks the lowering for the GPU kind; without a GPU, name one (an H100)."""
  if not hasattr(jax.sharding, 'AbstractDevice'):
    return contextlib.nullcontext()
  device = jax.sharding.AbstractDevice(device_kind='NVIDIA H100 80GB HBM3', num_cores=132,
                                       platform='gpu')
  mesh = jax.sharding.AbstractMesh((1,), ('x',), abstract_device=device)
  return jax.sharding.use_abstract_mesh(mesh)


def lower(fn, args, platform):
  ctx = _abstract_gpu() if platform == 'cuda' else contextlib.nullcontext()
  with ctx:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def attention_cases(target):
  from kernels.local_attention import block_sizes  # pylint: disable=g-import-not-at-top
  sizes = block_sizes.AttentionBlockSizes(block_q=32, block_k=32, max_kv_per_call=64)
  kw = dict(target=target, block_sizes=sizes)
  q5 = S((B, N, L, H, D), jnp.bfloat16)
  q4 = S((B, L, H, D), jnp.bfloat16)
  cache = S((B, 3 * L, H, D), jnp.bfloat16)
  t4 = S((B, N * L, H, D), jnp.bfloat16)

  def tf_grad(*args):
    outs = pallas_attention.teacher_forcing_attention(*args, num_chunks=N, **kw)
    return sum(o.astype(jnp.float32).sum() for o in outs)

  return {
      'chunk_local': (lambda q, k, v: pallas_attention.chunk_local_attention(q, k, v, **kw),
                      (q5,) * 3),
      'cached': (lambda q, k, v, kc, vc, m: pallas_attention.cached_chunk_attention(
          q, k, v, kc, vc, m, **kw), (q4,) * 3 + (cache,) * 2 + (S((3 * L,), jnp.bool_),)),
      'teacher_forcing_grad': (jax.grad(tf_grad, argnums=(0, 1, 2)), (t4,) * 6),
  }


def gdn_cases(target, dtype):
  kw = dict(target=target, chunk_size=64)
  q = S((B, N, 7, H, D), dtype)
  k = S((B, N, L, H, D), dtype)
  gates = S((B, N, L, H), jnp.float32)
  h0 = S((B, H, D, D), jnp.float32)
  qt, gt = S((B, L, H, D), dtype), S((B, L, H), jnp.float32)
  return {
      'arl2_memory': (lambda q, k, v, g, b, h: pallas_gated_delta.arl2_memory(
          q, k, v, g, b, initial_state=h, **kw), (q, k, k, gates, gates, h0)),
      'gated_delta_rule': (lambda q, k, v, g, b, h: pallas_gated_delta.gated_delta_rule(
          q, k, v, g, b, initial_state=h, **kw), (qt, qt, qt, gt, gt, h0)),
  }


@pytest.mark.parametrize('platform', list(PLATFORMS))
def test_attention_lowers(platform):
  target, marker = PLATFORMS[platform]
  for name, (fn, args) in attention_cases(target).items():
    assert marker in lower(fn, args, platform), name


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize('platform', list(PLATFORMS))
def test_gated_delta_lowers(platform, dtype):
  target, marker = PLATFORMS[platform]
  for name, (fn, args) in gdn_cases(target, dtype).items():
    assert marker in lower(fn, args, platform), name
