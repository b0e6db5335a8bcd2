"""Ahead-of-time lowering of the Pallas kernels for GPU (Triton) and TPU (Mosaic), on CPU.

No accelerator is needed: `lower(lowering_platforms=...)` runs the Pallas -> Triton IR and
Pallas -> Mosaic lowerings, so a primitive without a lowering rule, a bad block shape or a
dtype the backend rejects fails here. It does not compile (Triton -> PTX, Mosaic layout
passes) or run the kernels: that still needs the device (the `gpu`-marked tests).

Also here, the back-end choice that depends on the target: long gated-delta sequences go to
the XLA path on TPU (the kernel keeps a whole sequence in VMEM).
"""

import contextlib
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import common
from kernels.gated_delta import api as gdn_api
from kernels.gated_delta import block_sizes as gdn_block_sizes
from kernels.gated_delta import pallas_gated_delta
from kernels.gated_delta import xla as gdn_xla
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


# --------------------------------------------------------------------------------------------
# The TPU gated-delta kernel holds a whole (batch, head) sequence in VMEM: sequences above
# `GatedDeltaBlockSizes.max_tokens` are routed to the XLA chunked path by implementation=None
# and rejected by an explicit "pallas". Paper shapes: L = 4680 tokens per chunk, 7 chunks.
PAPER_L, PAPER_N = 4680, 7
SAMPLER_STEP_TOKENS = pallas_gated_delta.held_tokens(1, PAPER_L, PAPER_L)  # one chunk
TEACHER_FORCING_TOKENS = pallas_gated_delta.held_tokens(PAPER_N, PAPER_L, 2 * PAPER_L)


def _fake_device(platform, kind):
  return types.SimpleNamespace(platform=platform, device_kind=kind)


def test_tpu_default_limit_admits_one_chunk_and_not_teacher_forcing():
  sizes = gdn_block_sizes.get_block_sizes(jnp.bfloat16, PAPER_L,
                                          device=_fake_device('tpu', 'TPU v5 lite'))
  assert sizes == gdn_block_sizes.DEFAULTS['tpu']
  assert SAMPLER_STEP_TOKENS <= sizes.max_tokens < TEACHER_FORCING_TOKENS
  assert gdn_block_sizes.get_block_sizes(
      jnp.bfloat16, PAPER_L, device=_fake_device('gpu', 'NVIDIA H100')).max_tokens is None


@pytest.mark.parametrize('platform', ['tpu', 'gpu'])
def test_none_routes_long_sequences_to_xla_on_tpu_only(monkeypatch, platform):
  monkeypatch.setattr(common, 'local_platform', lambda: platform)
  sizes = gdn_block_sizes.DEFAULTS['tpu']
  resolve = functools.partial(gdn_api.resolve_implementation, None, False, 64, sizes=sizes)
  assert resolve(num_tokens=SAMPLER_STEP_TOKENS) == 'pallas'
  assert resolve(num_tokens=TEACHER_FORCING_TOKENS) == ('xla' if platform == 'tpu' else 'pallas')
  # An explicit choice is kept; the TPU kernel itself raises (below).
  assert gdn_api.resolve_implementation('pallas', False, 64, TEACHER_FORCING_TOKENS,
                                        sizes) == 'pallas'


def test_api_on_tpu_runs_the_xla_path_above_the_limit(monkeypatch):
  """The public API with implementation=None on a (pretend) TPU host: held tokens over
  max_tokens give exactly the XLA chunked result (the kernel is never built)."""
  monkeypatch.setattr(common, 'local_platform', lambda: 'tpu')
  rng = np.random.default_rng(0)
  n, l, r, h, d = 2, 24, 8, 2, 16
  q = rng.standard_normal((1, n, r, h, d)).astype(np.float32)
  k = rng.standard_normal((1, n, l, h, d)).astype(np.float32) / 4
  v = rng.standard_normal((1, n, l, h, d)).astype(np.float32)
  g = -rng.uniform(0.0, 1.0, (1, n, l, h)).astype(np.float32)
  beta = rng.uniform(0.1, 1.9, (1, n, l, h)).astype(np.float32)
  sizes = gdn_block_sizes.GatedDeltaBlockSizes(block_v=None, max_tokens=n * (l + r) - 1)
  routed = jax.jit(functools.partial(gdn_api.arl2_memory, chunk_size=8, block_sizes=sizes))(
      q, k, v, g, beta)
  expected = jax.jit(functools.partial(gdn_xla.chunk_arl2_memory, chunk_size=8))(
      q, k, v, g, beta)
  for a, e in zip(routed, expected):
    np.testing.assert_array_equal(a, e)


def test_explicit_tpu_kernel_raises_above_the_limit():
  sizes = gdn_block_sizes.DEFAULTS['tpu']
  q = S((1, PAPER_N, 2 * PAPER_L, 1, D), jnp.bfloat16)
  k = S((1, PAPER_N, PAPER_L, 1, D), jnp.bfloat16)
  gates = S((1, PAPER_N, PAPER_L, 1), jnp.float32)
  fn = functools.partial(pallas_gated_delta.arl2_memory, target='tpu', block_sizes=sizes)
  with pytest.raises(ValueError, match=rf'num_tokens={TEACHER_FORCING_TOKENS} .* must be <= '
                     r'max_tokens=16384 for the Pallas TPU gated-delta kernel'):
    lower(fn, (q, k, k, gates, gates), 'tpu')
  t = S((1, PAPER_N * PAPER_L, 1, D), jnp.bfloat16)
  with pytest.raises(ValueError, match='max_tokens=16384'):
    lower(functools.partial(pallas_gated_delta.gated_delta_rule, target='tpu', block_sizes=sizes),
          (t, t, t, S(t.shape[:3], jnp.float32), S(t.shape[:3], jnp.float32)), 'tpu')
  # Within the limit the same block sizes lower.
  _, marker = PLATFORMS['tpu']
  short = lambda shape: S((B, N, *shape), jnp.bfloat16)
  assert marker in lower(fn, (short((7, H, D)), short((L, H, D)), short((L, H, D)),
                              S((B, N, L, H), jnp.float32), S((B, N, L, H), jnp.float32)), 'tpu')
