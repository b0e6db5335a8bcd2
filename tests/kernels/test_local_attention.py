"""XLA local/cached/teacher-forcing attention against dense explicit-mask references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.local_attention import api
from kernels.local_attention import reference
from kernels.local_attention import xla

# Max relative error, max|a - b| / max|b|, against the fp32 oracle.
TOLERANCES = {
    'float32': dict(value=1e-5, grad=1e-4),
    'bfloat16': dict(value=2e-2),
}

# L = 7 on purpose: a ragged chunk length, not a power of two.
B, N, L, H, D = 2, 3, 7, 2, 8
M = 10  # cache slots


def rel_err(actual, expected):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  return np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30)


def assert_close(actual, expected, tol, what):
  err = rel_err(actual, expected)
  assert err <= tol, f'{what}: max relative error {err:.3g} > {tol:.3g}'


def normals(seed, *shapes):
  """fp32 numpy inputs (eager jax would compile every op for every new shape)."""
  rng = np.random.default_rng(seed)
  return tuple(rng.standard_normal(shape).astype(np.float32) for shape in shapes)


def grads_of(fn, args, **kwargs):
  """Gradients of a random linear functional of all of fn's outputs w.r.t. every arg."""

  def loss(*args):
    outs = fn(*args, **kwargs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    rng = np.random.default_rng(321)
    return sum(jnp.sum(o * rng.standard_normal(o.shape).astype(np.float32)) for o in outs)

  return jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)


def assert_values_and_grads_match(fn, ref_fn, args, **kwargs):
  tols = TOLERANCES['float32']
  actual = jax.jit(functools.partial(fn, **kwargs))(*args)
  expected = jax.jit(functools.partial(ref_fn, **kwargs))(*args)
  for i, (a, e) in enumerate(zip(jax.tree.leaves(actual), jax.tree.leaves(expected))):
    assert a.shape == e.shape
    assert_close(a, e, tols['value'], f'output {i}')
  for i, (a, e) in enumerate(zip(grads_of(fn, args, **kwargs), grads_of(ref_fn, args,
                                                                          **kwargs))):
    assert np.all(np.isfinite(a)), f'gradient {i} is not finite'
    assert_close(a, e, tols['grad'], f'gradient w.r.t. argument {i}')


def test_chunk_local_attention_matches_reference():
  args = normals(0, *[(B, N, L, H, D)] * 3)
  assert_values_and_grads_match(
      xla.chunk_local_attention, reference.chunk_local_attention_reference, args)


@pytest.mark.parametrize('key_block', [2, 3, 7])  # 3 and 2 do not divide L = 7; 7 does
def test_blocked_chunk_local_attention_values_and_grads(key_block):
  """The key-block sweep with its flash-style backward equals the dense reference (values and
  the gradients of q, k and v), including the shifted last block."""
  args = normals(5, *[(B, N, L, H, D)] * 3)
  assert_values_and_grads_match(
      functools.partial(xla.chunk_local_attention, key_block=key_block),
      reference.chunk_local_attention_reference, args)


def test_blocked_chunk_local_attention_temporaries_stay_flat():
  """Compiled value-and-grad temporaries: the sweep's stay O(L x block) per chunk as L grows,
  the dense path's grow as L^2."""
  def temps(length, key_block):
    x = jax.ShapeDtypeStruct((1, 2, length, 2, 8), jnp.float32)
    loss = lambda q, k, v: jnp.sum(xla.chunk_local_attention(q, k, v, key_block=key_block))
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes
  blocked = [temps(n, 64) for n in (1024, 2048, 4096)]
  dense = [temps(n, 8192) for n in (1024, 2048, 4096)]
  assert dense[2] > 3.5 * dense[1] > 3.5 ** 2 * dense[0]  # quadratic: 4x per doubling
  assert blocked[2] < 2.2 * blocked[1] < 2.2 ** 2 * blocked[0]  # linear: 2x per doubling
  assert blocked[2] < dense[2] / 16


def test_chunk_local_attention_is_per_chunk():
  q, k, v = normals(1, *[(B, N, L, H, D)] * 3)
  out = jax.jit(xla.chunk_local_attention)(q, k, v)
  one = reference.attention_reference(q[:, 1], k[:, 1], v[:, 1])
  assert_close(out[:, 1], one, TOLERANCES['float32']['value'], 'chunk 1')


def cache_mask(seed, batched):
  rng = np.random.default_rng(seed)
  valid = rng.uniform(size=(B, M) if batched else (M,)) < 0.6
  valid[..., 0] = True
  valid[..., -1] = False  # at least one invalid slot
  return valid


# Cache key blocks of the XLA cached attention: the default (one block: M <= 2048), blocks
# that divide M = 10, and blocks that do not (the last block is shifted back and masked).
KEY_BLOCKS = [xla.CACHE_KEY_BLOCK, 5, 3, 1]


@pytest.mark.parametrize('key_block', KEY_BLOCKS)
@pytest.mark.parametrize('batched_mask', [True, False])
def test_cached_chunk_attention_matches_reference(batched_mask, key_block):
  args = normals(2, *[(B, L, H, D)] * 3, *[(B, M, H, D)] * 2)
  valid = cache_mask(3, batched_mask)

  def with_mask(fn, **kw):
    return lambda *a: fn(*a, valid, **kw)

  assert_values_and_grads_match(
      with_mask(xla.cached_chunk_attention, key_block=key_block),
      with_mask(reference.cached_chunk_attention_reference), args)


def test_blocked_cached_attention_temporaries_do_not_grow_with_the_cache():
  """The blocked path's compiled temporaries stay flat from 8x to 64x the key block; the
  one-block path's logits grow with the cache."""
  def temp_bytes(cache_len, key_block):
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in [(1, 64, 2, 8)] * 3
            + [(1, cache_len, 2, 8)] * 2] + [jax.ShapeDtypeStruct((cache_len,), jnp.bool_)]
    fn = jax.jit(functools.partial(xla.cached_chunk_attention, key_block=key_block))
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes

  blocked = [temp_bytes(n, 256) for n in (2048, 16384)]
  dense = [temp_bytes(n, 16384) for n in (2048, 16384)]
  assert blocked[1] <= 1.25 * blocked[0], blocked
  assert dense[1] >= 4 * dense[0], dense
  assert blocked[1] * 4 <= dense[1], (blocked, dense)


@pytest.mark.parametrize('key_block', KEY_BLOCKS)
def test_cached_chunk_attention_ignores_invalid_slots(key_block):
  q, k, v, k_cache, v_cache = normals(4, *[(B, L, H, D)] * 3, *[(B, M, H, D)] * 2)
  valid = cache_mask(5, batched=True)
  fn = jax.jit(functools.partial(xla.cached_chunk_attention, key_block=key_block))
  out = fn(q, k, v, k_cache, v_cache, valid)
  garbage = np.where(valid[..., None, None], 0.0, 1e3).astype(np.float32)
  out_garbage = fn(q, k, v, k_cache + garbage, v_cache - garbage, valid)
  np.testing.assert_array_equal(out_garbage, out)

  # With no valid slot, only the chunk itself is visible.
  out_empty = fn(q, k, v, k_cache, v_cache, np.zeros((M,), bool))
  alone = reference.attention_reference(q, k, v)
  assert_close(out_empty, alone, TOLERANCES['float32']['value'], 'empty cache')


def teacher_forcing_inputs(seed):
  return normals(seed, *[(B, N * L, H, D)] * 6)


def test_teacher_forcing_matches_reference():
  assert_values_and_grads_match(
      xla.teacher_forcing_attention, reference.teacher_forcing_attention_reference,
      teacher_forcing_inputs(6), num_chunks=N)


@pytest.mark.parametrize('implementation', ['xla', 'reference'])
def test_teacher_forcing_noisy_chunk_0_sees_only_itself(implementation):
  q_c, k_c, v_c, q_n, k_n, v_n = teacher_forcing_inputs(7)
  fn = jax.jit(functools.partial(api.teacher_forcing_attention, num_chunks=N,
                                 implementation=implementation))
  _, o_noisy = fn(q_c, k_c, v_c, q_n, k_n, v_n)
  alone = reference.attention_reference(q_n[:, :L], k_n[:, :L], v_n[:, :L])
  assert_close(o_noisy[:, :L], alone, TOLERANCES['float32']['value'], 'noisy chunk 0')


@pytest.mark.parametrize('implementation', ['xla', 'reference'])
@pytest.mark.parametrize('changed_chunk', [1, 2])
def test_teacher_forcing_is_block_causal(implementation, changed_chunk):
  """Changing (clean and noisy) chunk n + 1 leaves both outputs of chunks <= n unchanged."""
  inputs = teacher_forcing_inputs(8)
  fn = jax.jit(functools.partial(api.teacher_forcing_attention, num_chunks=N,
                                 implementation=implementation))
  before = fn(*inputs)
  start = changed_chunk * L
  changed = []
  for i, x in enumerate(inputs):
    x = x.copy()
    x[:, start:start + L] += 10.0 + i
    changed.append(x)
  after = fn(*changed)
  for name, b, a in zip(('o_clean', 'o_noisy'), before, after):
    np.testing.assert_array_equal(a[:, :start], b[:, :start], err_msg=name)
    assert np.abs(np.asarray(a[:, start:start + L] - b[:, start:start + L])).max() > 1e-3


def test_streaming_matches_teacher_forcing():
  """Noisy chunk n under teacher forcing == cached attention over clean chunks < n."""
  q_c, k_c, v_c, q_n, k_n, v_n = teacher_forcing_inputs(9)
  _, o_noisy = jax.jit(functools.partial(xla.teacher_forcing_attention, num_chunks=N))(
      q_c, k_c, v_c, q_n, k_n, v_n)
  cached = jax.jit(xla.cached_chunk_attention)
  tol = TOLERANCES['float32']['value']
  for n in range(N):
    chunk = slice(n * L, (n + 1) * L)
    # A fixed-size cache holding every clean chunk, with only the earlier ones valid.
    valid = np.arange(N * L) < n * L
    out = cached(q_n[:, chunk], k_n[:, chunk], v_n[:, chunk], k_c, v_c, valid)
    assert_close(out, o_noisy[:, chunk], tol, f'chunk {n}')


def test_xla_bfloat16_inputs():
  q, k, v = normals(10, *[(B, N, L, H, D)] * 3)
  expected = reference.chunk_local_attention_reference(q, k, v)
  bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
  out = jax.jit(xla.chunk_local_attention)(bf16(q), bf16(k), bf16(v))
  assert out.dtype == jnp.bfloat16
  assert_close(out, expected, TOLERANCES['bfloat16']['value'], 'bf16 output')


def api_calls():
  q, k, v, k_cache, v_cache = normals(11, *[(B, L, H, D)] * 3, *[(B, M, H, D)] * 2)
  chunked = normals(12, *[(B, N, L, H, D)] * 3)
  tf = teacher_forcing_inputs(13)
  valid = np.ones((M,), bool)
  return {
      'chunk_local_attention': lambda **kw: api.chunk_local_attention(*chunked, **kw),
      'cached_chunk_attention': lambda **kw: api.cached_chunk_attention(
          q, k, v, k_cache, v_cache, valid, **kw),
      'teacher_forcing_attention': lambda **kw: api.teacher_forcing_attention(
          *tf, num_chunks=N, **kw),
  }


@pytest.mark.parametrize('name', list(api_calls()))
def test_api_rejects_unknown_and_unavailable_implementations(name):
  call = api_calls()[name]
  with pytest.raises(ValueError, match='triton'):
    call(implementation='triton')
  if jax.default_backend() == 'cpu':  # Compiled Pallas needs a GPU or TPU.
    with pytest.raises(ValueError, match='Pass interpret=True'):
      call(implementation='pallas')


def test_api_shape_errors():
  tf = teacher_forcing_inputs(14)
  with pytest.raises(ValueError, match='must be a multiple of num_chunks=4'):
    api.teacher_forcing_attention(*tf, num_chunks=4)
  with pytest.raises(ValueError, match=r'v_noisy has shape'):
    api.teacher_forcing_attention(*tf[:5], tf[5][:, :L], num_chunks=N)
  q, k, v, k_cache, v_cache = normals(15, *[(B, L, H, D)] * 3, *[(B, M, H, D)] * 2)
  with pytest.raises(ValueError, match='cache_valid has shape'):
    api.cached_chunk_attention(q, k, v, k_cache, v_cache, np.ones((M + 1,), bool))
  with pytest.raises(ValueError, match='cache_valid has dtype'):
    api.cached_chunk_attention(q, k, v, k_cache, v_cache, np.ones((M,), np.float32))
  with pytest.raises(ValueError, match='k has shape'):
    api.chunk_local_attention(q[:, None], k[:, None, :3], v[:, None])
