"""The jaxpr matmul-FLOP counter: plain products, scans times their length, conds, jits."""

import functools

import jax
import jax.numpy as jnp

from hybrid_video.flop_count import matmul_flops
from kernels.local_attention import xla


def _flops(fn, *shapes):
  return matmul_flops(jax.make_jaxpr(fn)(*[jnp.zeros(s, jnp.float32) for s in shapes]))


def test_dot_and_batched_einsum():
  assert _flops(jnp.dot, (3, 4), (4, 5)) == 2 * 3 * 4 * 5
  assert _flops(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), (2, 3, 4), (2, 4, 5)) == \
      2 * 2 * 3 * 4 * 5


def test_convolution_counts_window_times_input_features():
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  # output 1 x 6 x 5 x 7, window 3 x 2, 4 input features
  assert _flops(conv, (1, 8, 6, 4), (3, 2, 4, 7)) == 2 * (6 * 5 * 7) * (3 * 2) * 4
  grouped = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2)
  assert _flops(grouped, (1, 8, 6, 4), (3, 2, 2, 6)) == 2 * (6 * 5 * 6) * (3 * 2) * 2


def test_scan_counts_every_trip_and_jit_and_cond_count_once():
  def body(c, _):
    return c @ c, None
  scanned = lambda x: jax.lax.scan(body, x, None, length=7)[0]
  assert _flops(scanned, (4, 4)) == 7 * 2 * 4**3
  assert _flops(jax.jit(scanned), (4, 4)) == 7 * 2 * 4**3
  branchy = lambda p, x: jax.lax.cond(p[0] > 0, lambda x: x @ x @ x, lambda x: x @ x, x)
  assert _flops(branchy, (1,), (4, 4)) == 2 * 2 * 4**3


def test_blocked_cache_attention_flops_grow_with_the_cache():
  """XLA's cost analysis sees one block of the sweep; the jaxpr count sees all of them and
  equals the one-block path's count when the blocks tile the cache."""
  def flops(cache_len, key_block):
    fn = functools.partial(xla.cached_chunk_attention, key_block=key_block)
    args = [jnp.zeros(s, jnp.float32) for s in [(1, 16, 2, 8)] * 3 + [(1, cache_len, 2, 8)] * 2]
    return matmul_flops(jax.make_jaxpr(fn)(*args, jnp.ones((cache_len,), bool)))
  assert flops(256, 32) == flops(256, 256)
  assert flops(512, 32) - flops(256, 32) == 2 * (flops(256, 32) - flops(128, 32)) > 0  # linear
