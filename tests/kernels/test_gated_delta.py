"""Chunked gated delta rule and ARL2 memory against the token-by-token fp32 oracle."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.gated_delta import api
from kernels.gated_delta import reference
from kernels.gated_delta import xla as chunk

# Max relative error, max|a - b| / max|b|, against the fp32 oracle.
TOLERANCES = {
    'float32': dict(value=1e-5, grad=1e-4),
    'bfloat16': dict(value=1e-2),
}

B, H, K, V = 2, 2, 8, 6

# Pre-activation ranges: g = -softplus(x), beta = 2 sigmoid(x), as the ARL2 gates are built.
MODERATE_DECAY = (-3.0, 1.0)
WEAK_DECAY = (-9.0, -5.0)  # g in about [-7e-3, -1e-4]
STRONG_DECAY = (5.0, 20.0)  # g in about [-20, -5]
EXTREME_DECAY = (55.0, 65.0)  # g around -60: exp(g) ~ 1e-26, cumulative sums underflow
MID_BETA = (-3.0, 3.0)
SMALL_BETA = (-9.0, -6.0)  # beta in about [2e-4, 5e-3]
LARGE_BETA = (6.0, 9.0)  # beta in about [1.995, 1.9998]


def rel_err(actual, expected):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  return np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30)


def assert_close(actual, expected, tol, what):
  err = rel_err(actual, expected)
  assert err <= tol, f'{what}: max relative error {err:.3g} > {tol:.3g}'


def l2_normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_gdn_inputs(seed, lead_shape, *, decay=MODERATE_DECAY, beta=MID_BETA,
                    reads=None, with_state=True):
  """q, k, v, g, beta, initial_state (fp32 numpy) with leading [B, T] or [B, N, L] dims.

  Built in numpy: eager jax would compile every op for every new shape.
  """
  rng = np.random.default_rng(seed)
  heads = (*lead_shape, H)
  q_shape = (*lead_shape[:-1], reads, H, K) if reads is not None else (*heads, K)
  q = l2_normalize(rng.standard_normal(q_shape))
  k = l2_normalize(rng.standard_normal((*heads, K)))
  v = rng.standard_normal((*heads, V))
  g = -np.logaddexp(0.0, rng.uniform(*decay, size=heads))  # -softplus
  b = 2 / (1 + np.exp(-rng.uniform(*beta, size=heads)))  # 2 sigmoid
  h0 = rng.standard_normal((lead_shape[0], H, K, V)) if with_state else None
  return tuple(None if x is None else x.astype(np.float32) for x in (q, k, v, g, b, h0))


naive = jax.jit(reference.naive_recurrent_gated_delta_rule)
chunked = jax.jit(chunk.chunk_gated_delta_rule, static_argnames='chunk_size')
arl2_ref = jax.jit(reference.arl2_memory_reference)
arl2_chunked = jax.jit(chunk.chunk_arl2_memory, static_argnames='chunk_size')


def projected_loss(fn, seed, *args, **kwargs):
  """A random linear functional of all of fn's outputs, so gradients see every output."""
  outs = fn(*args, **kwargs)
  rng = np.random.default_rng(seed)
  return sum(jnp.sum(o * rng.standard_normal(o.shape).astype(np.float32)) for o in outs)


@functools.partial(jax.jit, static_argnames=('fn', 'chunk_size'))
def grads_of(fn, q, k, v, g, beta, h0, chunk_size=None):
  extra = {} if chunk_size is None else dict(chunk_size=chunk_size)

  def loss(q, k, v, g, beta, h0):
    return projected_loss(fn, 123, q, k, v, g, beta, initial_state=h0, **extra)

  return jax.grad(loss, argnums=tuple(range(6)))(q, k, v, g, beta, h0)


GRAD_NAMES = ('q', 'k', 'v', 'g', 'beta', 'initial_state')

GDN_CASES = {
    # name: (T, C, decay, beta, with_state)
    'ragged_C16': (37, 16, MODERATE_DECAY, MID_BETA, True),
    'ragged_C8': (37, 8, MODERATE_DECAY, MID_BETA, True),
    'ragged_no_state': (37, 8, MODERATE_DECAY, MID_BETA, False),
    'T_below_C': (5, 16, MODERATE_DECAY, MID_BETA, True),
    'strong_decay': (37, 16, STRONG_DECAY, MID_BETA, True),
    'extreme_decay': (37, 8, EXTREME_DECAY, MID_BETA, True),
    'weak_decay': (37, 16, WEAK_DECAY, MID_BETA, True),
    'beta_near_0': (37, 8, MODERATE_DECAY, SMALL_BETA, True),
    'beta_near_2': (37, 16, WEAK_DECAY, LARGE_BETA, True),
    # C > 16: the blocked triangular solve (16-row diagonal blocks + matrix products).
    'blocked_C32': (77, 32, MODERATE_DECAY, MID_BETA, True),
    'blocked_C64_beta_near_2': (150, 64, WEAK_DECAY, LARGE_BETA, True),
}


@pytest.mark.parametrize('chunk_size', [8, 16, 24, 32, 64])
def test_unit_lower_solve_matches_dense_solve(chunk_size):
  k1, k2 = jax.random.split(jax.random.key(chunk_size))
  a = jnp.tril(jax.random.normal(k1, (3, 2, chunk_size, chunk_size)) * 0.3, -1)
  rhs = jax.random.normal(k2, (3, 2, chunk_size, 40))
  expected = jnp.linalg.solve(jnp.eye(chunk_size) + a, rhs)
  actual = chunk.unit_lower_solve(a, rhs)
  assert float(jnp.max(jnp.abs(actual - expected)) / jnp.max(jnp.abs(expected))) <= 1e-5


@pytest.mark.parametrize('case', list(GDN_CASES))
def test_chunk_matches_naive(case):
  seq_len, chunk_size, decay, beta_range, with_state = GDN_CASES[case]
  q, k, v, g, beta, h0 = make_gdn_inputs(
      0, (B, seq_len), decay=decay, beta=beta_range, with_state=with_state)
  o_ref, s_ref = naive(q, k, v, g, beta, initial_state=h0)
  o, s = chunked(q, k, v, g, beta, initial_state=h0, chunk_size=chunk_size)
  assert o.shape == (B, seq_len, H, V) and s.shape == (B, H, K, V)
  assert o.dtype == v.dtype and s.dtype == jnp.float32
  tol = TOLERANCES['float32']['value']
  assert_close(o, o_ref, tol, 'o')
  assert_close(s, s_ref, tol, 'final_state')


# T = 37 only, so the three gradient programs (naive, C = 16, C = 8) compile once each.
GRAD_CASES = [name for name, case in GDN_CASES.items() if case[0] == 37 and case[4]]
GRAD_CASES.append('blocked_C32')  # gradients through the blocked solve


@pytest.mark.parametrize('case', GRAD_CASES)
def test_chunk_gradients_match_naive(case):
  seq_len, chunk_size, decay, beta_range, _ = GDN_CASES[case]
  inputs = make_gdn_inputs(1, (B, seq_len), decay=decay, beta=beta_range)
  expected = grads_of(reference.naive_recurrent_gated_delta_rule, *inputs)
  actual = grads_of(chunk.chunk_gated_delta_rule, *inputs, chunk_size=chunk_size)
  for name, a, e in zip(GRAD_NAMES, actual, expected):
    assert np.all(np.isfinite(a)), f'd/d{name} is not finite'
    assert_close(a, e, TOLERANCES['float32']['grad'], f'd/d{name}')


def test_padding_tokens_leave_state_unchanged():
  q, k, v, g, beta, h0 = make_gdn_inputs(2, (B, 37))
  zero_tail = lambda x: np.concatenate([x[:, :30], np.zeros_like(x[:, 30:])], axis=1)
  _, s_prefix = naive(q[:, :30], k[:, :30], v[:, :30], g[:, :30], beta[:, :30],
                      initial_state=h0)
  _, s_padded = chunked(q, zero_tail(k), zero_tail(v), zero_tail(g), zero_tail(beta),
                        initial_state=h0, chunk_size=8)
  assert_close(s_padded, s_prefix, TOLERANCES['float32']['value'], 'final_state')


def test_chunk_bfloat16_inputs():
  q, k, v, g, beta, h0 = make_gdn_inputs(3, (B, 37))
  o_ref, s_ref = naive(q, k, v, g, beta, initial_state=h0)
  bf16 = lambda x: x.astype(jnp.bfloat16)  # as the model feeds q, k, v; gates stay fp32
  o, s = chunked(bf16(q), bf16(k), bf16(v), g, beta, initial_state=h0, chunk_size=16)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  tol = TOLERANCES['bfloat16']['value']
  assert_close(o, o_ref, tol, 'o')
  assert_close(s, s_ref, tol, 'final_state')


# ARL2 memory: N chunks of L = 7 written tokens (not a multiple of C = 4), R = 5 readers.
N, L, R = 3, 7, 5
ARL2_C = 4


def make_arl2_inputs(seed, with_state=True, decay=MODERATE_DECAY):
  return make_gdn_inputs(seed, (B, N, L), reads=R, with_state=with_state, decay=decay)


@pytest.mark.parametrize('with_state', [True, False])
def test_arl2_chunk_matches_reference(with_state):
  q, k, v, g, beta, h0 = make_arl2_inputs(4, with_state)
  expected = arl2_ref(q, k, v, g, beta, initial_state=h0)
  actual = arl2_chunked(q, k, v, g, beta, initial_state=h0, chunk_size=ARL2_C)
  shapes = [(B, N, R, H, V), (B, N, H, K, V), (B, H, K, V)]
  for name, a, e, shape in zip(('reads', 'prev_states', 'final_state'), actual, expected,
                               shapes):
    assert a.shape == shape, f'{name} shape {a.shape} != {shape}'
    assert_close(a, e, TOLERANCES['float32']['value'], name)


def test_arl2_gradients_match_reference():
  inputs = make_arl2_inputs(5)
  expected = grads_of(reference.arl2_memory_reference, *inputs)
  actual = grads_of(chunk.chunk_arl2_memory, *inputs, chunk_size=ARL2_C)
  for name, a, e in zip(GRAD_NAMES, actual, expected):
    assert np.all(np.isfinite(a)), f'd/d{name} is not finite'
    assert_close(a, e, TOLERANCES['float32']['grad'], f'd/d{name}')


def test_arl2_states_chain_through_the_naive_recurrence():
  """prev_states[:, n + 1] is the naive scan of chunk n started from prev_states[:, n]."""
  q, k, v, g, beta, h0 = make_arl2_inputs(6)
  _, prev_states, final_state = arl2_chunked(q, k, v, g, beta, initial_state=h0,
                                             chunk_size=ARL2_C)
  np.testing.assert_array_equal(prev_states[:, 0], h0)
  states = list(np.moveaxis(np.asarray(prev_states), 1, 0)[1:]) + [final_state]
  for n in range(N):
    _, s = naive(k[:, n], k[:, n], v[:, n], g[:, n], beta[:, n], initial_state=prev_states[:, n])
    assert_close(states[n], s, TOLERANCES['float32']['value'], f'state after chunk {n}')


def test_arl2_first_read_by_hand():
  q, k, v, g, beta, h0 = make_arl2_inputs(7)
  scale = K**-0.5
  reads, _, _ = arl2_chunked(q, k, v, g, beta, initial_state=h0, chunk_size=ARL2_C)
  by_hand = np.einsum('brhk,bhkv->brhv', scale * np.asarray(q[:, 0], np.float64),
                      np.asarray(h0, np.float64))
  assert_close(reads[:, 0], by_hand, TOLERANCES['float32']['value'], 'reads[:, 0]')

  reads, _, _ = arl2_chunked(q, k, v, g, beta, initial_state=None, chunk_size=ARL2_C)
  np.testing.assert_array_equal(reads[:, 0], 0.0)
  assert np.abs(np.asarray(reads[:, 1:])).max() > 0


@pytest.mark.parametrize('implementation', [None, 'reference'])
def test_api_dispatch(implementation):
  tol = TOLERANCES['float32']['value']
  q, k, v, g, beta, h0 = make_gdn_inputs(8, (B, 37))
  expected = naive(q, k, v, g, beta, initial_state=h0)
  fn = jax.jit(functools.partial(api.gated_delta_rule, chunk_size=16,
                                 implementation=implementation))
  for a, e in zip(fn(q, k, v, g, beta, initial_state=h0), expected):
    assert_close(a, e, tol, 'gated_delta_rule')

  q, k, v, g, beta, h0 = make_arl2_inputs(9)
  expected = arl2_ref(q, k, v, g, beta, initial_state=h0)
  fn = jax.jit(functools.partial(api.arl2_memory, chunk_size=ARL2_C,
                                 implementation=implementation))
  for a, e in zip(fn(q, k, v, g, beta, initial_state=h0), expected):
    assert_close(a, e, tol, 'arl2_memory')


@pytest.mark.parametrize('fn', [api.gated_delta_rule, api.arl2_memory])
def test_api_rejects_unknown_and_unavailable_implementations(fn):
  args = make_gdn_inputs(10, (B, 4))[:5]
  if fn is api.arl2_memory:
    args = make_arl2_inputs(10)[:5]
  with pytest.raises(ValueError, match='triton'):
    fn(*args, implementation='triton')
  if jax.default_backend() == 'cpu':  # Compiled Pallas needs a GPU or TPU.
    with pytest.raises(ValueError, match='Pass interpret=True'):
      fn(*args, implementation='pallas')


def test_api_shape_errors():
  q, k, v, g, beta, h0 = make_gdn_inputs(11, (B, 6))
  with pytest.raises(ValueError, match=r'beta has shape \(2, 5, 2\), expected'):
    api.gated_delta_rule(q, k, v, g, beta[:, :5])
  with pytest.raises(ValueError, match='initial_state has shape'):
    api.gated_delta_rule(q, k, v, g, beta, initial_state=h0[..., :3])
  with pytest.raises(ValueError, match='chunk_size=0'):
    api.gated_delta_rule(q, k, v, g, beta, chunk_size=0)
  q, k, v, g, beta, h0 = make_arl2_inputs(12)
  with pytest.raises(ValueError, match='v has shape'):
    api.arl2_memory(q, k, v[:, :, :3], g, beta)
