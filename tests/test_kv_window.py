"""Sink + window K/V eviction, numerically (model.kv_cache.sink_chunks / window_chunks).

A bounded cache keeps the first S chunks (sinks) and the last W chunks written before the
current one. So in streaming, a softmax layer's token of chunk n sees exactly the clean chunks
{c < S} and {n - W <= c < n}, plus chunk n itself. That holds in the denoising passes and in
the context pass that computes the K/V written for later layers.

The reference is a teacher-forcing forward whose softmax layers use a dense mask written here
from that rule, with no cache code:
  clean query of chunk m: clean keys of chunks c <= m with c < S or c >= m - W;
  noisy query of chunk n: clean keys of chunks c < n with c < S or c >= n - W, and the noisy
  keys of chunk n.
Hybrid layers are unchanged (their memory is a state, not a cache). The mixed model (ratio 0.5)
streams 8 chunks with S = 1, W = 2: the 3 cache slots are full after chunk 2, and the context
passes of chunks 3..7 each evict one chunk, so each window slot is rewritten two or three times
while the sink slot keeps chunk 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_video.nn.attention import SelfAttention
from hybrid_video.nn.embeddings import apply_rope
from hybrid_video.nn.model import CausalDiT
from tests.helpers import open_memory_gates, perturbed, random_clips, rel_err, tiny_model_config

B, CHUNKS, F, HW = 2, 8, 2, 16
SINKS, WINDOW = 1, 2
TOL = 1e-5


def window_mask(num_chunks, chunk_len):
  """[2T, 2T] bool over [clean ; noisy] queries x [clean ; noisy] keys, T = num_chunks * L."""
  c = np.arange(num_chunks)
  kept = lambda m, upto: (c <= upto) & ((c < SINKS) | (c >= m - WINDOW))
  clean_q = np.stack([kept(m, m) for m in range(num_chunks)])       # [query chunk, key chunk]
  noisy_q = np.stack([kept(n, n - 1) for n in range(num_chunks)])
  own = np.eye(num_chunks, dtype=bool)
  blocks = np.block([[clean_q, np.zeros_like(own)], [noisy_q, own]])
  return np.repeat(np.repeat(blocks, chunk_len, 0), chunk_len, 1)


def windowed_teacher_forcing_heads(self, x_clean, x_noisy, angles, num_chunks):
  """SelfAttention.teacher_forcing_heads with the dense sink + window mask."""
  q, k, v = (jnp.concatenate(pair, axis=1)
             for pair in zip(self.project(x_clean), self.project(x_noisy)))
  rot = lambda a: apply_rope(a, jnp.concatenate([angles, angles]))  # same frame positions
  q, k = rot(q), rot(k)
  t = x_clean.shape[1]
  mask = window_mask(num_chunks, t // num_chunks)
  s = jnp.einsum("bihd,bjhd->bhij", q, k, precision="highest") * q.shape[-1] ** -0.5
  p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
  y = jnp.einsum("bhij,bjhd->bihd", p, v, precision="highest")
  return y[:, :t], y[:, t:]


def make_model(window: bool):
  """The mixed tiny model, every parameter perturbed and memory gates opened."""
  cfg = tiny_model_config(0.5)
  cfg.kv_cache.sink_chunks = SINKS if window else 0
  cfg.kv_cache.window_chunks = WINDOW if window else 0
  return open_memory_gates(perturbed(CausalDiT(cfg, rngs=nnx.Rngs(0)), seed=1))


def make_inputs(seed=0):
  """clean, noisy [B, CHUNKS*F, HW, HW, 1], t [B, CHUNKS], labels (numpy: no eager compiles)."""
  return random_clips(B, CHUNKS, F, HW, seed)


def stream(model, clean, noisy, t, labels):
  """Denoising-pass output of every chunk given the clean history; also the slot history."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def denoise(state, carry, x, t, context):
    return nnx.merge(graphdef, state).step(x, t, context, carry, write=False)[0]

  @jax.jit
  def write(state, carry, x, context):
    return nnx.merge(graphdef, state).step(x, jnp.zeros((B,)), context, carry, write=True)[1]

  context = model.embed_condition(labels, B)
  carry = model.init_carry(B, (HW, HW), capacity_chunks=CHUNKS)
  outs, slots = [], []
  for n in range(CHUNKS):
    sl = slice(n * F, (n + 1) * F)
    outs.append(denoise(state, carry, noisy[:, sl], t[:, n], context))
    carry = write(state, carry, clean[:, sl], context)
    slots.append(np.asarray(carry["slot_chunk"]))
  return jnp.concatenate(outs, axis=1), slots


def dense_window_reference(model, clean, noisy, t, labels):
  """Teacher forcing with the softmax layers' dense sink + window mask (jitted: eager is slow)."""
  graphdef, state = nnx.split(model)
  original = SelfAttention.teacher_forcing_heads
  SelfAttention.teacher_forcing_heads = windowed_teacher_forcing_heads
  try:
    return jax.jit(lambda s, *a: nnx.merge(graphdef, s).teacher_forcing(*a))(
        state, clean, noisy, t, labels)
  finally:
    SelfAttention.teacher_forcing_heads = original


@pytest.fixture(scope="module")
def data():
  inputs = make_inputs()
  model = make_model(window=True)
  streamed, slots = stream(model, *inputs)
  return inputs, model, streamed, slots


def test_window_mask_is_the_rule():
  m = window_mask(CHUNKS, 1)  # one token per chunk
  clean, noisy_on_clean = m[:CHUNKS, :CHUNKS], m[CHUNKS:, :CHUNKS]
  assert list(np.nonzero(noisy_on_clean[6])[0]) == [0, 4, 5]
  assert list(np.nonzero(clean[6])[0]) == [0, 4, 5, 6]
  assert list(np.nonzero(noisy_on_clean[2])[0]) == [0, 1]
  assert not noisy_on_clean[0].any() and not m[:CHUNKS, CHUNKS:].any()
  np.testing.assert_array_equal(m[CHUNKS:, CHUNKS:], np.eye(CHUNKS, dtype=bool))


def test_sink_and_window_stream_equals_dense_mask_reference(data):
  inputs, model, streamed, slots = data
  assert model.cache_capacity(CHUNKS) == SINKS + WINDOW
  # The cache really evicted: after chunk 3 it holds the sink 0 and the window 2, 3; after
  # chunk 7, 0 and 6, 7.
  assert sorted(slots[3].tolist()) == [0, 2, 3] and sorted(slots[-1].tolist()) == [0, 6, 7]
  reference = dense_window_reference(model, *inputs)
  for n in range(CHUNKS):
    sl = slice(n * F, (n + 1) * F)
    err = rel_err(streamed[:, sl], reference[:, sl])
    assert err <= TOL, f"chunk {n}: max relative error {err:.3g} > {TOL:.0e}"
  assert float(jnp.max(jnp.abs(reference))) > 1e-2


def test_window_changes_only_the_chunks_that_lost_history(data):
  """Chunks 0..S+W see their whole history; later ones differ from the unbounded cache."""
  inputs, _, windowed, _ = data
  full, _ = stream(make_model(window=False), *inputs)
  for n in range(CHUNKS):
    sl = slice(n * F, (n + 1) * F)
    err = rel_err(windowed[:, sl], full[:, sl])
    if n <= SINKS + WINDOW:
      assert err <= TOL, f"chunk {n} should see its whole history ({err:.3g})"
    else:
      assert err > 1e-3, f"chunk {n} should have lost chunks {SINKS}..{n - WINDOW - 1}"
