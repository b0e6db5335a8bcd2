"""Every gated-delta implementation against fixtures from FLA's naive recurrence.

The fixtures (tests/fixtures/gdn/*.npz, written by `/work/fixenv/bin/python -m
scripts.fixtures.make_gdn`) hold fp32 inputs and the outputs of fla-core 0.6.0's
`naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale, initial_state)`, the oracle the
method doc names, so this checks the project's recurrence against code it shares nothing with.

Convention map (FLA -> project): beta and g swap places in the argument list; the layout
[B, T, H, K] / [B, T, H, V], gates [B, T, H] and the K-first state [B, H, K, V] are the same;
scale multiplies q in both (default K^-1/2); the fixture's scale is passed explicitly.
The "arl2" fixture chains FLA's scan over 3 AR chunks (S_n from S_{n-1}) with the block read
reads[:, n] = scale q[:, n] . S_{n-1}.

Implementations: "reference" (token-by-token scan), "xla" (chunked WY path) at C = 8 and 16,
and "pallas" in interpret mode (GPU/Triton layout, C = 16), all through the public api; the
compiled Pallas kernel too where a GPU is visible (marked `gpu`; run with JAX_PLATFORMS=cuda).
Acceptance: fp32, max|a - b| / max|b| <= 1e-5, per-token outputs and final state.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
import pytest

from kernels.gated_delta import api
from kernels.gated_delta import block_sizes as block_sizes_lib
from tests.kernels.pallas_modes import needs_gpu

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        'fixtures', 'gdn')
GDN_CASES = ('moderate', 'zero_state', 'strong_decay', 'weak_decay', 'beta_near_0',
             'beta_near_2', 'short_odd_dims')
TOL = 1e-5  # fp32 against fp32 FLA outputs

# (implementation, chunk_size, interpret); Pallas with small value and read blocks.
IMPLEMENTATIONS = {
    'reference': ('reference', 16, False),
    'xla_C8': ('xla', 8, False),
    'xla_C16': ('xla', 16, False),
    'pallas_interpret_C16': ('pallas', 16, True),
    'pallas_gpu_C16': ('pallas', 16, False),  # compiled; only where a GPU is visible
}
IMPL_PARAMS = [pytest.param(name, id=name, marks=needs_gpu if name == 'pallas_gpu_C16' else ())
               for name in IMPLEMENTATIONS]
PALLAS_SIZES = block_sizes_lib.GatedDeltaBlockSizes(block_v=16, block_r=16)


def rel_err(actual, expected):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  return np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30)


@functools.lru_cache(maxsize=None)
def fixture(name):
  path = os.path.join(FIXTURES, f'{name}.npz')
  if not os.path.exists(path):
    pytest.fail(f'missing {path}: run /work/fixenv/bin/python -m scripts.fixtures.make_gdn')
  with np.load(path) as data:
    return {key: data[key] for key in data.files}


@functools.lru_cache(maxsize=None)
def jitted(fn_name, implementation, chunk_size, interpret, scale):
  fn = getattr(api, fn_name)
  extra = dict(block_sizes=PALLAS_SIZES) if implementation == 'pallas' else {}
  partial = functools.partial(fn, scale=scale, chunk_size=chunk_size,
                              implementation=implementation, interpret=interpret, **extra)
  # Project order: g before beta (FLA takes beta before g).
  return jax.jit(lambda q, k, v, g, beta, h0: partial(q, k, v, g, beta, initial_state=h0))


@pytest.mark.parametrize('impl', IMPL_PARAMS)
@pytest.mark.parametrize('case', GDN_CASES)
def test_gated_delta_rule_matches_fla(case, impl):
  f = fixture(case)
  fn = jitted('gated_delta_rule', *IMPLEMENTATIONS[impl], float(f['scale']))
  o, final_state = fn(f['q'], f['k'], f['v'], f['g'], f['beta'], f.get('initial_state'))
  assert o.shape == f['o'].shape and final_state.shape == f['final_state'].shape
  for name, actual in (('o', o), ('final_state', final_state)):
    err = rel_err(actual, f[name])
    assert err <= TOL, f'{case} {impl} {name}: max relative error {err:.3g} > {TOL:.0e}'


@pytest.mark.parametrize('impl', IMPL_PARAMS)
def test_arl2_memory_matches_fla(impl):
  f = fixture('arl2')
  fn = jitted('arl2_memory', *IMPLEMENTATIONS[impl], float(f['scale']))
  outputs = fn(f['q'], f['k'], f['v'], f['g'], f['beta'], f['initial_state'])
  for name, actual in zip(('reads', 'prev_states', 'final_state'), outputs):
    assert actual.shape == f[name].shape, name
    err = rel_err(actual, f[name])
    assert err <= TOL, f'arl2 {impl} {name}: max relative error {err:.3g} > {TOL:.0e}'


def test_fixtures_are_not_degenerate():
  """The cases cover what they claim: strong/weak decay, beta near 0 and 2, a live state."""
  g = lambda c: fixture(c)['g']
  beta = lambda c: fixture(c)['beta']
  assert g('strong_decay').max() < -4.0 and g('weak_decay').min() > -1e-2
  assert beta('beta_near_0').max() < 1e-2 and beta('beta_near_2').min() > 1.99
  for case in GDN_CASES:
    f = fixture(case)
    assert f['q'].shape[1] % 8, f'{case}: length should not be a multiple of any C'
    assert np.abs(f['final_state']).max() > 1e-2 and np.abs(f['o']).max() > 1e-2, case
  assert 'initial_state' not in fixture('zero_state')
  # The initial state still matters in the output (decay does not wipe it before token 0).
  assert np.abs(fixture('arl2')['reads'][:, 0]).max() > 1e-2
