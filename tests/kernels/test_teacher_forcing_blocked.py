"""The blocked XLA teacher-forcing attention against the dense-mask oracle.

`xla.teacher_forcing_attention` takes the blocked sweep (online softmax over key blocks, a
flash-style custom VJP recomputing each block from the saved log-sum-exp) once the clip has
more than `key_block` tokens. Here: its values and all six gradients (fp32, max relative error
<= 1e-5) for key blocks that divide the chunk and the clip and ones that do not, odd chunk
lengths; that it never forms a key block the block-causal mask empties; and that its compiled
temporaries stay flat as the clip grows, where the dense path's grow quadratically.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.local_attention import api
from kernels.local_attention import block_sizes as block_sizes_lib
from kernels.local_attention import reference
from kernels.local_attention import xla
from tests.kernels.pallas_modes import assert_close

TOL = 1e-5  # fp32, values and gradients
B, H, D = 2, 2, 8
NAMES = ('q_clean', 'k_clean', 'v_clean', 'q_noisy', 'k_noisy', 'v_noisy')

# (N chunks, L tokens per chunk, key block); every case has N * L > key block (blocked path).
CASES = {
    'block_is_the_chunk': (3, 7, 7),       # divides L and N * L
    'block_divides_clip_only': (3, 7, 3),  # divides N * L = 21, not L: blocks straddle chunks
    'block_divides_nothing': (3, 7, 5),    # every range's last block is shifted back
    'odd_chunks_of_5': (4, 5, 3),
    'block_longer_than_chunk': (2, 9, 16),  # blocks are min(key_block, L) = 9 keys
}


def normals(seed, num_chunks, chunk_len, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return tuple(rng.standard_normal((B, num_chunks * chunk_len, H, D)).astype(dtype)
               for _ in range(6))


def projected_loss(fn, *args):
  """A random linear functional of both outputs, so the gradients see every output."""
  rng = np.random.default_rng(321)
  return sum(jnp.sum(o.astype(jnp.float32) * rng.standard_normal(o.shape).astype(np.float32))
             for o in fn(*args))


@functools.lru_cache(maxsize=None)
def jitted(fn):
  """fn and the gradients of its projected loss w.r.t. all six inputs, jitted once."""
  loss = functools.partial(projected_loss, fn)
  return jax.jit(fn), jax.jit(jax.grad(loss, argnums=tuple(range(6))))


def value_and_grads(fn, args):
  forward, gradients = jitted(fn)
  return forward(*args), gradients(*args)


@functools.lru_cache(maxsize=None)
def blocked_fn(num_chunks, key_block):
  return functools.partial(xla.teacher_forcing_attention, num_chunks=num_chunks,
                           key_block=key_block)


@functools.lru_cache(maxsize=None)
def oracle_fn(num_chunks):
  return functools.partial(reference.teacher_forcing_attention_reference,
                           num_chunks=num_chunks)


@pytest.mark.parametrize('case', list(CASES))
def test_values_and_all_gradients_match_the_dense_oracle(case):
  num_chunks, chunk_len, key_block = CASES[case]
  assert num_chunks * chunk_len > key_block  # the blocked path, not the dense one
  args = normals(0, num_chunks, chunk_len)
  outs, grads = value_and_grads(blocked_fn(num_chunks, key_block), args)
  ref_outs, ref_grads = value_and_grads(oracle_fn(num_chunks), args)
  for name, a, e in zip(('o_clean', 'o_noisy'), outs, ref_outs):
    assert a.shape == e.shape and a.dtype == e.dtype, name
    assert_close(a, e, TOL, f'{case}: {name}')
  for name, a, e in zip(NAMES, grads, ref_grads):
    assert a.shape == e.shape and a.dtype == e.dtype, name
    assert_close(a, e, TOL, f'{case}: d{name}')


def test_bfloat16_inputs():
  num_chunks, chunk_len, key_block = CASES['block_divides_nothing']
  args = normals(1, num_chunks, chunk_len)
  bf16 = [jnp.asarray(x, jnp.bfloat16) for x in args]
  outs, grads = value_and_grads(blocked_fn(num_chunks, key_block), bf16)
  expected = reference.teacher_forcing_attention_reference(*args, num_chunks=num_chunks)
  for a, e in zip(outs, expected):
    assert a.dtype == jnp.bfloat16
    assert_close(a, e, 2e-2, 'bf16 output')
  assert all(g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))
             for g in grads)


@pytest.mark.parametrize('key_block', [7, 3])
def test_hidden_key_blocks_are_never_formed(key_block):
  """NaN keys and values in clean chunk j reach neither the outputs nor dq of the rows that
  cannot see it (clean chunks < j, noisy chunks <= j), forward or backward.

  Masking is not enough for this (0 * NaN = NaN in p v and in do v^T): it holds only if no
  block of those rows ever covers chunk j, i.e. the sweep skips what the mask empties. With
  key_block = 3 blocks straddle chunk boundaries, so the skip is per position, not per chunk.
  """
  num_chunks, chunk_len = 3, 7
  args = normals(2, num_chunks, chunk_len)
  blocked = blocked_fn(num_chunks, key_block)
  outs, grads = value_and_grads(blocked, args)
  for j in range(1, num_chunks):
    poisoned = [x.copy() for x in args]
    for i in (1, 2):  # k_clean, v_clean
      poisoned[i][:, j * chunk_len:(j + 1) * chunk_len] = np.nan
    bad_outs, bad_grads = value_and_grads(blocked, poisoned)
    blind = {'clean': slice(0, j * chunk_len), 'noisy': slice(0, (j + 1) * chunk_len)}
    for name, a, e in zip(('clean', 'noisy'), bad_outs, outs):
      np.testing.assert_array_equal(a[:, blind[name]], e[:, blind[name]],
                                    err_msg=f'o_{name}, chunk {j} poisoned')
    for name, a, e in (('clean', bad_grads[0], grads[0]), ('noisy', bad_grads[3], grads[3])):
      np.testing.assert_array_equal(a[:, blind[name]], e[:, blind[name]],
                                    err_msg=f'dq_{name}, chunk {j} poisoned')
    assert np.isnan(np.asarray(bad_outs[0][:, j * chunk_len:])).any()  # it was seen


def test_api_reads_the_key_block_from_block_sizes():
  num_chunks, chunk_len, key_block = CASES['block_divides_nothing']
  args = normals(3, num_chunks, chunk_len)
  sizes = block_sizes_lib.AttentionBlockSizes(xla_key_block=key_block)
  via_api = jax.jit(functools.partial(api.teacher_forcing_attention, num_chunks=num_chunks,
                                      implementation='xla', block_sizes=sizes))(*args)
  direct = jax.jit(functools.partial(xla.teacher_forcing_attention, num_chunks=num_chunks,
                                     key_block=key_block))(*args)
  for a, e in zip(via_api, direct):
    np.testing.assert_array_equal(a, e)
  with pytest.raises(ValueError, match='xla_key_block=0 must be None or a positive integer'):
    block_sizes_lib.AttentionBlockSizes(xla_key_block=0)
  with pytest.raises(ValueError, match='key_block=0 must be a positive integer'):
    xla.teacher_forcing_attention(*args, num_chunks=num_chunks, key_block=0)


def compiled_temp_bytes(num_chunks, key_block, grad):
  """Temporaries of the compiled forward, or of value_and_grad w.r.t. all six inputs."""
  chunk_len, heads, head_dim = 128, 2, 4  # logits dominate the O(N L H D) buffers
  arg = jax.ShapeDtypeStruct((1, num_chunks * chunk_len, heads, head_dim), jnp.float32)
  attention = blocked_fn(num_chunks, key_block)
  fn = attention
  if grad:
    fn = jax.value_and_grad(lambda *a: sum(jnp.sum(o) for o in attention(*a)),
                            argnums=tuple(range(6)))
  return jax.jit(fn).lower(*[arg] * 6).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize('grad', [False, True], ids=['forward', 'value_and_grad'])
def test_compiled_temporaries_stay_flat_as_the_clip_grows(grad):
  """2 -> 8 chunks of 128 tokens: the blocked sweep (128-key blocks) keeps one block of
  logits; the dense path (one block of 10**6 keys) holds N L x N L of them."""
  blocked = [compiled_temp_bytes(n, 128, grad) for n in (2, 8)]
  dense = [compiled_temp_bytes(n, 10**6, grad) for n in (2, 8)]
  assert blocked[1] <= 1.25 * blocked[0], blocked
  assert dense[1] >= 8 * dense[0], dense
  assert 8 * blocked[1] <= dense[1], (blocked, dense)
