"""Dense-mask softmax attention oracles for the ARL2 attention patterns.

Every function builds the explicit [Tq, Tk] visibility mask and calls `attention_reference`:
fp32 logits, HIGHEST precision, one softmax per query row.

Shapes: B batch, H heads, D head dim, N chunks, L tokens per chunk, M cache slots.
"""

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def attention_reference(q, k, v, *, mask=None, scale=None):
  """Dense softmax attention.

  Args:
    q: [B, Tq, H, D].
    k, v: [B, Tk, H, D].
    mask: bool, broadcastable to [B, H, Tq, Tk]; True = may attend. Every query row needs at
      least one visible key.
    scale: multiplies the logits; defaults to D**-0.5.

  Returns:
    [B, Tq, H, D] in q.dtype.
  """
  if scale is None:
    scale = q.shape[-1]**-0.5
  f32 = lambda x: x.astype(jnp.float32)
  logits = scale * jnp.einsum('bqhd,bkhd->bhqk', f32(q), f32(k), precision=_HIGHEST)
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum('bhqk,bkhd->bqhd', probs, f32(v), precision=_HIGHEST)
  return out.astype(q.dtype)


def _flatten_chunks(x):
  """[B, N, L, H, D] -> [B, N * L, H, D]."""
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def chunk_local_attention_reference(q, k, v, *, scale=None):
  """Bidirectional attention within each chunk. q, k, v: [B, N, L, H, D] -> [B, N, L, H, D]."""
  _, num_chunks, chunk_len = q.shape[:3]
  chunk_id = jnp.repeat(jnp.arange(num_chunks), chunk_len)
  mask = chunk_id[:, None] == chunk_id[None, :]
  out = attention_reference(
      _flatten_chunks(q), _flatten_chunks(k), _flatten_chunks(v), mask=mask, scale=scale)
  return out.reshape(q.shape)


def cached_chunk_attention_reference(q, k, v, k_cache, v_cache, cache_valid, *, scale=None):
  """One chunk attending to the valid cache slots and to all of its own keys.

  Args:
    q, k, v: [B, L, H, D].
    k_cache, v_cache: [B, M, H, D].
    cache_valid: bool [M] or [B, M].

  Returns:
    [B, L, H, D].
  """
  batch, chunk_len = q.shape[:2]
  cache_valid = jnp.broadcast_to(cache_valid, (batch, k_cache.shape[1]))
  own = jnp.ones((batch, chunk_len), dtype=bool)
  mask = jnp.concatenate([cache_valid, own], axis=1)[:, None, None, :]
  keys = jnp.concatenate([k_cache, k], axis=1)
  values = jnp.concatenate([v_cache, v], axis=1)
  return attention_reference(q, keys, values, mask=mask, scale=scale)


def teacher_forcing_attention_reference(q_clean, k_clean, v_clean, q_noisy, k_noisy, v_noisy,
                                        *, num_chunks, scale=None):
  """Teacher-forcing attention over [clean ; noisy] with one dense mask.

  Clean chunk n sees clean chunks <= n; noisy chunk n sees clean chunks < n and noisy chunk n.

  Args:
    all inputs: [B, N * L, H, D]; num_chunks: N.

  Returns:
    (o_clean, o_noisy), each [B, N * L, H, D].
  """
  seq_len = q_clean.shape[1]
  if num_chunks <= 0 or seq_len % num_chunks:
    raise ValueError(f'{seq_len=} must be a positive multiple of {num_chunks=}')
  chunk_id = jnp.repeat(jnp.arange(num_chunks), seq_len // num_chunks)
  q_id, k_id = chunk_id[:, None], chunk_id[None, :]
  clean_rows = jnp.concatenate([k_id <= q_id, jnp.zeros_like(k_id <= q_id)], axis=1)
  noisy_rows = jnp.concatenate([k_id < q_id, k_id == q_id], axis=1)
  mask = jnp.concatenate([clean_rows, noisy_rows], axis=0)
  cat = lambda a, b: jnp.concatenate([a, b], axis=1)
  out = attention_reference(
      cat(q_clean, q_noisy), cat(k_clean, k_noisy), cat(v_clean, v_noisy), mask=mask,
      scale=scale)
  return out[:, :seq_len], out[:, seq_len:]
