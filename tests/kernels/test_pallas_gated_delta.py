"""Pallas gated-delta kernels against the token-by-token fp32 oracle and the chunked jnp path.

Every class runs in interpret mode on CPU and, marked `gpu`, compiled on a GPU when one is
present (see pallas_modes.py). Lengths are not multiples of C = 16; V = 32 runs as two value
blocks of 16; the gates cover weak, strong and extreme decay and beta near 0 and near 2.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.gated_delta import api
from kernels.gated_delta import block_sizes as block_sizes_lib
from kernels.gated_delta import pallas_gated_delta
from kernels.gated_delta import reference
from kernels.gated_delta import xla as chunk
from tests.kernels.pallas_modes import assert_close
from tests.kernels.pallas_modes import MODES

# Max relative error, max|a - b| / max|b|, against the fp32 oracle.
TOLERANCES = {
    'float32': dict(value=1e-5, grad=1e-5),
    'bfloat16': dict(value=1e-2),
}

B, H, K, V = 2, 2, 16, 32
T = 37  # gated_delta_rule tokens: 3 sub-chunks, the last one ragged
N, L, R = 3, 21, 11  # ARL2: 3 AR chunks of 21 written tokens (2 sub-chunks each), 11 readers
C = 16
SIZES = block_sizes_lib.GatedDeltaBlockSizes(block_v=16, block_r=16)

# Pre-activation ranges: g = -softplus(x), beta = 2 sigmoid(x), as the ARL2 gates are built.
MODERATE_DECAY = (-3.0, 1.0)
WEAK_DECAY = (-9.0, -5.0)  # g in about [-7e-3, -1e-4], "g near 0"
STRONG_DECAY = (5.0, 20.0)  # g in about [-20, -5]
EXTREME_DECAY = (55.0, 65.0)  # g around -60: exp(g) ~ 1e-26
MID_BETA = (-3.0, 3.0)
SMALL_BETA = (-9.0, -6.0)  # beta in about [2e-4, 5e-3]
LARGE_BETA = (6.0, 9.0)  # beta in about [1.995, 1.9998]

CASES = {
    # name: (decay, beta, with_state)
    'ragged': (MODERATE_DECAY, MID_BETA, True),
    'no_initial_state': (MODERATE_DECAY, MID_BETA, False),
    'weak_decay': (WEAK_DECAY, MID_BETA, True),
    'strong_decay': (STRONG_DECAY, MID_BETA, True),
    'extreme_decay': (EXTREME_DECAY, MID_BETA, True),
    'beta_near_0': (MODERATE_DECAY, SMALL_BETA, True),
    'beta_near_2': (WEAK_DECAY, LARGE_BETA, True),
}
GRAD_NAMES = ('q', 'k', 'v', 'g', 'beta', 'initial_state')


def l2_normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_inputs(seed, lead_shape, *, decay=MODERATE_DECAY, beta=MID_BETA, reads=None,
                with_state=True, key_dim=K, value_dim=V):
  """q, k, v, g, beta, initial_state (fp32 numpy) with leading [B, T] or [B, N, L] dims."""
  rng = np.random.default_rng(seed)
  heads = (*lead_shape, H)
  q_shape = (*lead_shape[:-1], reads, H, key_dim) if reads else (*heads, key_dim)
  q = l2_normalize(rng.standard_normal(q_shape))
  k = l2_normalize(rng.standard_normal((*heads, key_dim)))
  v = rng.standard_normal((*heads, value_dim))
  g = -np.logaddexp(0.0, rng.uniform(*decay, size=heads))
  b = 2 / (1 + np.exp(-rng.uniform(*beta, size=heads)))
  h0 = rng.standard_normal((lead_shape[0], H, key_dim, value_dim)) if with_state else None
  return tuple(None if x is None else x.astype(np.float32) for x in (q, k, v, g, b, h0))


def case_inputs(name, seed, op):
  decay, beta, with_state = CASES[name]
  if op == 'gdn':
    return make_inputs(seed, (B, T), decay=decay, beta=beta, with_state=with_state)
  return make_inputs(seed, (B, N, L), reads=R, decay=decay, beta=beta, with_state=with_state)


@functools.lru_cache(maxsize=None)
def pallas_fn(op, interpret, target):
  """Jitted Pallas op with the test block sizes, as f(q, k, v, g, beta, h0)."""
  kernel = {'gdn': pallas_gated_delta.gated_delta_rule, 'arl2': pallas_gated_delta.arl2_memory}
  fn = functools.partial(kernel[op], chunk_size=C, block_sizes=SIZES, interpret=interpret,
                         target=target)
  return jax.jit(lambda q, k, v, g, beta, h0: fn(q, k, v, g, beta, initial_state=h0))


def oracle(op):
  fn = {'gdn': reference.naive_recurrent_gated_delta_rule,
        'arl2': reference.arl2_memory_reference}[op]
  return lambda q, k, v, g, beta, h0: fn(q, k, v, g, beta, initial_state=h0)


def chunked(op):
  fn = {'gdn': chunk.chunk_gated_delta_rule, 'arl2': chunk.chunk_arl2_memory}[op]
  return lambda q, k, v, g, beta, h0: fn(q, k, v, g, beta, initial_state=h0, chunk_size=C)


ORACLES = {op: jax.jit(oracle(op)) for op in ('gdn', 'arl2')}
CHUNKED = {op: jax.jit(chunked(op)) for op in ('gdn', 'arl2')}
OUTPUT_NAMES = {'gdn': ('o', 'final_state'), 'arl2': ('reads', 'prev_states', 'final_state')}


def projected_loss(fn, *args):
  """A random linear functional of all of fn's outputs, so gradients see every output."""
  rng = np.random.default_rng(123)
  return sum(jnp.sum(o.astype(jnp.float32) * rng.standard_normal(o.shape).astype(np.float32))
             for o in fn(*args))


@functools.lru_cache(maxsize=None)
def grad_fn(fn, with_state=True):
  """Gradients w.r.t. q, k, v, g, beta and (when one is given) the initial state."""
  return jax.jit(jax.grad(functools.partial(projected_loss, fn),
                          argnums=tuple(range(6 if with_state else 5))))


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('op', ['gdn', 'arl2'])
class TestPallasGatedDelta:

  @pytest.mark.parametrize('case', list(CASES))
  def test_matches_oracle(self, mode, op, case):
    inputs = case_inputs(case, 0, op)
    actual = pallas_fn(op, **mode)(*inputs)
    expected = ORACLES[op](*inputs)
    for name, a, e in zip(OUTPUT_NAMES[op], actual, expected):
      assert a.shape == e.shape and a.dtype == e.dtype, name
      assert_close(a, e, TOLERANCES['float32']['value'], f'{case} {name}')

  @pytest.mark.parametrize('case', list(CASES))
  def test_gradients_match_oracle(self, mode, op, case):
    inputs = case_inputs(case, 1, op)
    with_state = inputs[-1] is not None  # zero initial state: no gradient w.r.t. it
    actual = grad_fn(pallas_fn(op, **mode), with_state)(*inputs)
    expected = grad_fn(ORACLES[op], with_state)(*inputs)
    for name, a, e in zip(GRAD_NAMES, actual, expected):
      assert np.all(np.isfinite(a)), f'd/d{name} is not finite'
      assert_close(a, e, TOLERANCES['float32']['grad'], f'{case} d/d{name}')

  def test_matches_chunked_jnp(self, mode, op):
    """The second reference: the chunked algebra in plain jnp (same sub-chunk size)."""
    inputs = case_inputs('ragged', 2, op)
    for name, a, e in zip(OUTPUT_NAMES[op], pallas_fn(op, **mode)(*inputs),
                          CHUNKED[op](*inputs)):
      assert_close(a, e, TOLERANCES['float32']['value'], f'vs chunked {name}')

  def test_bfloat16_inputs(self, mode, op):
    q, k, v, g, beta, h0 = case_inputs('ragged', 3, op)
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)  # as the model feeds q, k, v; gates fp32
    actual = pallas_fn(op, **mode)(bf16(q), bf16(k), bf16(v), g, beta, h0)
    expected = ORACLES[op](q, k, v, g, beta, h0)
    assert actual[0].dtype == jnp.bfloat16
    for name, a, e in zip(OUTPUT_NAMES[op], actual, expected):
      assert_close(a, e, TOLERANCES['bfloat16']['value'], f'bf16 {name}')


@pytest.mark.parametrize('mode', MODES)
class TestPallasGatedDeltaShapes:

  def test_sequence_shorter_than_a_sub_chunk(self, mode):
    inputs = make_inputs(4, (B, 5))
    actual = pallas_fn('gdn', **mode)(*inputs)
    for name, a, e in zip(OUTPUT_NAMES['gdn'], actual, ORACLES['gdn'](*inputs)):
      assert_close(a, e, TOLERANCES['float32']['value'], name)

  def test_dims_that_are_not_powers_of_two(self, mode):
    """K = 12, V = 20 are zero-padded for the Triton layout; the result must not change."""
    inputs = make_inputs(5, (1, 2, 9), reads=3, key_dim=12, value_dim=20)
    fn = functools.partial(pallas_gated_delta.arl2_memory, chunk_size=C,
                           block_sizes=block_sizes_lib.GatedDeltaBlockSizes(block_v=None),
                           **mode)
    actual = jax.jit(lambda q, k, v, g, b, h0: fn(q, k, v, g, b, initial_state=h0))(*inputs)
    for name, a, e in zip(OUTPUT_NAMES['arl2'], actual, ORACLES['arl2'](*inputs)):
      assert a.shape == e.shape, name
      assert_close(a, e, TOLERANCES['float32']['value'], name)


class TestApi:

  def test_none_picks_xla_on_cpu(self):
    if jax.default_backend() != 'cpu':
      pytest.skip('checks the CPU choice')
    assert api.resolve_implementation(None, interpret=False) == 'xla'
    inputs = make_inputs(6, (B, T))
    fn = jax.jit(lambda q, k, v, g, beta, h0: api.gated_delta_rule(
        q, k, v, g, beta, initial_state=h0, chunk_size=C))
    for a, e in zip(fn(*inputs), CHUNKED['gdn'](*inputs)):
      np.testing.assert_array_equal(a, e)

  def test_pallas_without_interpret_on_cpu_raises(self):
    if jax.default_backend() != 'cpu':
      pytest.skip('checks the CPU error')
    q, k, v, g, beta, _ = make_inputs(7, (B, N, L), reads=R)
    with pytest.raises(ValueError, match=r"cannot run on the 'cpu' backend.*interpret=True"):
      api.arl2_memory(q, k, v, g, beta, implementation='pallas')
    with pytest.raises(ValueError, match='interpret=True'):
      pallas_gated_delta.arl2_memory(q, k, v, g, beta)

  def test_interpret_runs_the_kernel(self):
    """interpret=True asks for the kernel, also with implementation=None."""
    assert api.resolve_implementation(None, interpret=True) == 'pallas'
    inputs = make_inputs(8, (B, N, L), reads=R)
    fn = jax.jit(lambda q, k, v, g, beta, h0: api.arl2_memory(
        q, k, v, g, beta, initial_state=h0, chunk_size=C, implementation=None,
        interpret=True, block_sizes=SIZES))
    for a, e in zip(fn(*inputs), ORACLES['arl2'](*inputs)):
      assert_close(a, e, TOLERANCES['float32']['value'], 'api arl2_memory')

  def test_gpu_kernel_rejects_small_sub_chunks(self):
    q, k, v, g, beta, _ = make_inputs(9, (B, T))
    with pytest.raises(ValueError, match='chunk_size=8 must be a power of two >= 16'):
      api.gated_delta_rule(q, k, v, g, beta, chunk_size=8, implementation='pallas',
                           interpret=True)


def test_block_sizes_are_validated():
  with pytest.raises(ValueError, match='block_v=48 must be None or a power of two'):
    block_sizes_lib.GatedDeltaBlockSizes(block_v=48)
  with pytest.raises(ValueError, match='num_warps=0'):
    block_sizes_lib.GatedDeltaBlockSizes(num_warps=0)
  assert block_sizes_lib.shape_bucket(4680) == 'medium'
