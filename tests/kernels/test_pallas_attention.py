"""Pallas flash-attention kernel against the dense explicit-mask oracles (fp32, HIGHEST).

Every class runs in interpret mode on CPU and, marked `gpu`, compiled on a GPU when one is
present (see pallas_modes.py). Shapes are tiny but awkward: L = 21 and M = 37 are not multiples
of the 16-token blocks, so padding, masking and several key blocks are all exercised.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.local_attention import api
from kernels.local_attention import block_sizes as block_sizes_lib
from kernels.local_attention import pallas_attention
from kernels.local_attention import reference
from kernels.local_attention import xla
from tests.kernels.pallas_modes import assert_close
from tests.kernels.pallas_modes import MODES
from tests.kernels.pallas_modes import MODES_WITH_TPU_LAYOUT

# Max relative error, max|a - b| / max|b|, against the fp32 oracle.
TOLERANCES = {
    'float32': dict(value=1e-5, grad=1e-5),
    'bfloat16': dict(value=2e-2),
}

B, N, L, H, D = 2, 3, 21, 2, 16
M = 37  # cache slots
# 16-token blocks; max_kv_per_call splits long key sets on the TPU layout; the backward works
# on 16 x 16 (query, key) blocks, so it pads too and skips the key blocks the history mask
# hides from a query block.
SIZES = block_sizes_lib.AttentionBlockSizes(block_q=16, block_k=16, max_kv_per_call=32,
                                            bwd_block_q=16, bwd_block_k=16)


def normals(seed, *shapes):
  rng = np.random.default_rng(seed)
  return tuple(rng.standard_normal(shape).astype(np.float32) for shape in shapes)


def cache_mask(seed, batched):
  rng = np.random.default_rng(seed)
  valid = rng.uniform(size=(B, M) if batched else (M,)) < 0.6
  valid[..., 0] = True
  valid[..., -1] = False
  return valid


def projected_loss(fn, *args):
  """A random linear functional of all of fn's outputs, so gradients see every output."""
  outs = jax.tree.leaves(fn(*args))
  rng = np.random.default_rng(321)
  return sum(jnp.sum(o.astype(jnp.float32) * rng.standard_normal(o.shape).astype(np.float32))
             for o in outs)


def assert_values_and_grads_match(fn, ref_fn, args, what):
  tols = TOLERANCES['float32']
  actual = jax.jit(fn)(*args)
  expected = jax.jit(ref_fn)(*args)
  for i, (a, e) in enumerate(zip(jax.tree.leaves(actual), jax.tree.leaves(expected))):
    assert a.shape == e.shape and a.dtype == e.dtype
    assert_close(a, e, tols['value'], f'{what}: output {i}')
  argnums = tuple(range(len(args)))
  grads = jax.jit(jax.grad(functools.partial(projected_loss, fn), argnums))(*args)
  ref_grads = jax.jit(jax.grad(functools.partial(projected_loss, ref_fn), argnums))(*args)
  for i, (a, e) in enumerate(zip(grads, ref_grads)):
    assert np.all(np.isfinite(a)), f'{what}: gradient {i} is not finite'
    assert_close(a, e, tols['grad'], f'{what}: gradient w.r.t. argument {i}')


def teacher_forcing_inputs(seed):
  return normals(seed, *[(B, N * L, H, D)] * 6)


@pytest.mark.parametrize('mode', MODES)
class TestChunkLocalAttention:

  def test_matches_reference(self, mode):
    fn = functools.partial(pallas_attention.chunk_local_attention, block_sizes=SIZES, **mode)
    assert_values_and_grads_match(fn, reference.chunk_local_attention_reference,
                                  normals(0, *[(B, N, L, H, D)] * 3), 'chunk_local')

  def test_bfloat16_inputs(self, mode):
    q, k, v = normals(1, *[(B, N, L, H, D)] * 3)
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    fn = functools.partial(pallas_attention.chunk_local_attention, block_sizes=SIZES, **mode)
    out = jax.jit(fn)(bf16(q), bf16(k), bf16(v))
    assert out.dtype == jnp.bfloat16
    expected = reference.chunk_local_attention_reference(q, k, v)
    assert_close(out, expected, TOLERANCES['bfloat16']['value'], 'bf16 chunk_local')


@pytest.mark.parametrize('mode', MODES)
class TestCachedChunkAttention:

  def test_matches_reference(self, mode):
    args = normals(2, *[(B, L, H, D)] * 3, *[(B, M, H, D)] * 2)
    valid = cache_mask(3, batched=True)
    fn = lambda *a: pallas_attention.cached_chunk_attention(*a, valid, block_sizes=SIZES, **mode)
    ref_fn = lambda *a: reference.cached_chunk_attention_reference(*a, valid)
    assert_values_and_grads_match(fn, ref_fn, args, 'cached_chunk')

  def test_invalid_slots_are_ignored(self, mode):
    q, k, v, k_cache, v_cache = normals(4, *[(B, L, H, D)] * 3, *[(B, M, H, D)] * 2)
    valid = cache_mask(5, batched=False)  # [M], shared by the batch
    fn = jax.jit(functools.partial(pallas_attention.cached_chunk_attention, block_sizes=SIZES,
                                   **mode))
    out = fn(q, k, v, k_cache, v_cache, valid)
    garbage = np.where(valid[..., None, None], 0.0, 1e3).astype(np.float32)
    np.testing.assert_array_equal(fn(q, k, v, k_cache + garbage, v_cache - garbage, valid), out)
    # No valid slot: only the chunk itself is visible.
    out_empty = fn(q, k, v, k_cache, v_cache, np.zeros((M,), bool))
    assert_close(out_empty, reference.attention_reference(q, k, v),
                 TOLERANCES['float32']['value'], 'empty cache')

  def test_bfloat16_inputs(self, mode):
    args = normals(6, *[(B, L, H, D)] * 3, *[(B, M, H, D)] * 2)
    valid = cache_mask(7, batched=True)
    fn = jax.jit(functools.partial(pallas_attention.cached_chunk_attention, block_sizes=SIZES,
                                   **mode))
    out = fn(*[jnp.asarray(x, jnp.bfloat16) for x in args], valid)
    assert out.dtype == jnp.bfloat16
    expected = reference.cached_chunk_attention_reference(*args, valid)
    assert_close(out, expected, TOLERANCES['bfloat16']['value'], 'bf16 cached_chunk')


@pytest.mark.parametrize('mode', MODES_WITH_TPU_LAYOUT)
class TestTeacherForcingAttention:
  """On the TPU layout the 63 clean keys exceed max_kv_per_call = 32, so the history runs
  as two key segments merged by log-sum-exp, one of them empty for the early chunks."""

  def test_matches_reference(self, mode):
    fn = functools.partial(pallas_attention.teacher_forcing_attention, num_chunks=N,
                           block_sizes=SIZES, **mode)
    ref_fn = functools.partial(reference.teacher_forcing_attention_reference, num_chunks=N)
    inputs = teacher_forcing_inputs(8)
    if mode['target'] == 'tpu':  # the backward is layout-independent jnp: values suffice
      for a, e in zip(jax.jit(fn)(*inputs), ref_fn(*inputs)):
        assert_close(a, e, TOLERANCES['float32']['value'], 'teacher_forcing (TPU layout)')
      return
    assert_values_and_grads_match(fn, ref_fn, inputs, 'teacher_forcing')

  def test_streaming_matches_teacher_forcing(self, mode):
    """Noisy chunk n under teacher forcing == the cached kernel over clean chunks < n."""
    q_c, k_c, v_c, q_n, k_n, v_n = teacher_forcing_inputs(9)
    tf = jax.jit(functools.partial(pallas_attention.teacher_forcing_attention, num_chunks=N,
                                   block_sizes=SIZES, **mode))
    _, o_noisy = tf(q_c, k_c, v_c, q_n, k_n, v_n)
    cached = jax.jit(functools.partial(pallas_attention.cached_chunk_attention,
                                       block_sizes=SIZES, **mode))
    for n in range(N):
      chunk = slice(n * L, (n + 1) * L)
      valid = np.arange(N * L) < n * L
      out = cached(q_n[:, chunk], k_n[:, chunk], v_n[:, chunk], k_c, v_c, valid)
      assert_close(out, o_noisy[:, chunk], TOLERANCES['float32']['value'], f'chunk {n}')


@pytest.mark.parametrize('mode', MODES)
class TestFlashAttentionCore:

  def test_history_mask_and_lse(self, mode):
    """The history-masked call alone: o and lse against the dense mask; chunk 0 sees nothing."""
    q, k, v = normals(10, *[(B, N * L, H, D)] * 3)
    fn = jax.jit(functools.partial(pallas_attention.flash_attention, history_chunk_len=L,
                                   block_sizes=SIZES, **mode))
    o, lse = fn(q, k, v)
    chunk_id = np.arange(N * L) // L
    mask = chunk_id[None, :] < chunk_id[:, None]
    s = np.einsum('bqhd,bkhd->bhqk', q.astype(np.float64), k.astype(np.float64)) * D**-0.5
    s = np.where(mask, s, -np.inf)
    with np.errstate(divide='ignore', invalid='ignore'):
      ref_lse = np.log(np.exp(s).sum(-1))
    seen = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), seen)
    assert_close(np.asarray(lse)[seen], ref_lse[seen], TOLERANCES['float32']['value'], 'lse')
    np.testing.assert_array_equal(np.asarray(o)[:, :L], 0.0)
    ref_o = reference.attention_reference(q[:, L:], k, v, mask=mask[L:])
    assert_close(o[:, L:], ref_o, TOLERANCES['float32']['value'], 'o')

  def test_hidden_key_blocks_are_skipped_forward_and_backward(self, mode):
    """The history mask hides the last chunk from every query. With 32-token chunks (two
    16-key blocks each) no block of the forward kernel's loop or of the backward's (query
    block, key block) pairs covers it, so NaN keys and values there change no output and no
    gradient. Masking alone would not do (0 * NaN = NaN in p v and in do v^T)."""
    chunk_len = 32
    q, k, v = normals(14, *[(B, N * chunk_len, H, D)] * 3)
    fn = functools.partial(pallas_attention.flash_attention, history_chunk_len=chunk_len,
                           block_sizes=SIZES, **mode)
    rng = np.random.default_rng(15)
    w_o = rng.standard_normal(q.shape).astype(np.float32)
    w_lse = rng.standard_normal((B, H, N * chunk_len)).astype(np.float32)

    def loss(q, k, v):
      o, lse = fn(q, k, v)  # chunk 0 sees nothing: lse = -inf there
      return jnp.sum(o * w_o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse * w_lse, 0.0))

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    expected = value_and_grad(q, k, v)
    hidden = slice((N - 1) * chunk_len, None)
    k_bad, v_bad = k.copy(), v.copy()
    k_bad[:, hidden] = np.nan
    v_bad[:, hidden] = np.nan
    actual = value_and_grad(q, k_bad, v_bad)
    np.testing.assert_array_equal(actual[0], expected[0], err_msg='loss')
    for name, a, e in zip(('dq', 'dk', 'dv'), actual[1], expected[1]):
      np.testing.assert_array_equal(a, e, err_msg=name)


class TestApi:

  def test_none_picks_xla_on_cpu(self):
    if jax.default_backend() != 'cpu':
      pytest.skip('checks the CPU choice')
    assert api.resolve_implementation(None, interpret=False) == 'xla'
    q, k, v = normals(11, *[(B, N, L, H, D)] * 3)
    np.testing.assert_array_equal(api.chunk_local_attention(q, k, v),
                                  xla.chunk_local_attention(q, k, v))

  def test_pallas_without_interpret_on_cpu_raises(self):
    if jax.default_backend() != 'cpu':
      pytest.skip('checks the CPU error')
    q, k, v = normals(12, *[(B, N, L, H, D)] * 3)
    with pytest.raises(ValueError, match=r"cannot run on the 'cpu' backend.*interpret=True"):
      api.chunk_local_attention(q, k, v, implementation='pallas')
    with pytest.raises(ValueError, match='interpret=True'):
      pallas_attention.chunk_local_attention(q, k, v)

  def test_interpret_runs_the_kernel(self):
    """interpret=True asks for the kernel, also with implementation=None."""
    assert api.resolve_implementation('pallas', interpret=True) == 'pallas'
    assert api.resolve_implementation(None, interpret=True) == 'pallas'
    tf = teacher_forcing_inputs(13)
    fn = jax.jit(functools.partial(api.teacher_forcing_attention, num_chunks=N,
                                   implementation=None, interpret=True, block_sizes=SIZES))
    expected = reference.teacher_forcing_attention_reference(*tf, num_chunks=N)
    for a, e in zip(fn(*tf), expected):
      assert_close(a, e, TOLERANCES['float32']['value'], 'api teacher_forcing')


def test_block_sizes_are_validated():
  with pytest.raises(ValueError, match='block_q=24 must be a power of two'):
    block_sizes_lib.AttentionBlockSizes(block_q=24)
  with pytest.raises(ValueError, match='max_kv_per_call=100'):
    block_sizes_lib.AttentionBlockSizes(block_k=64, max_kv_per_call=100)
  sizes = block_sizes_lib.AttentionBlockSizes()
  with pytest.raises(AttributeError):
    sizes.block_q = 64  # frozen
  assert block_sizes_lib.shape_bucket(4680) == 'medium'
