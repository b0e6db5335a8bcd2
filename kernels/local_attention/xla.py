"""Softmax attention for the ARL2 patterns in plain jnp: the XLA production path.

- `chunk_local_attention`: bidirectional attention within each chunk (the intra branch).
- `cached_chunk_attention`: one chunk attends to a K/V cache plus its own keys (sampling).
- `teacher_forcing_attention`: [clean ; noisy] training forward of the softmax layers.

The last two see two key sets (history, own chunk) under one softmax. They share
`_two_key_set_attention`, which scores each set separately and normalises with a shared max,
so no dense mask over the concatenated keys is ever built.

Logits are fp32 (HIGHEST precision, fp32 accumulation); outputs are in q.dtype.
Shapes: B batch, H heads, D head dim, N chunks, L tokens per chunk, M cache slots.
"""

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _default_scale(q, scale):
  return q.shape[-1]**-0.5 if scale is None else scale


def _logits(q, k, scale, mask):
  """q [..., Q, H, D], k [..., Kn, H, D] -> fp32 [..., H, Q, Kn], -inf where mask is False."""
  s = scale * jnp.einsum('...qhd,...khd->...hqk', q, k, precision=_HIGHEST,
                         preferred_element_type=jnp.float32)
  return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _weighted_values(p, v):
  """p [..., H, Q, Kn] (fp32), v [..., Kn, H, D] -> fp32 [..., Q, H, D]."""
  return jnp.einsum('...hqk,...khd->...qhd', p.astype(v.dtype), v, precision=_HIGHEST,
                    preferred_element_type=jnp.float32)


def _two_key_set_attention(q, k_a, v_a, mask_a, k_b, v_b, mask_b, scale):
  """Softmax attention over two key sets at once, without concatenating them.

  Args:
    q: [..., Q, H, D].
    k_a, v_a: [..., Ka, H, D]; k_b, v_b: [..., Kb, H, D]; leading dims broadcast against q's.
    mask_a, mask_b: bool broadcastable to [..., H, Q, Ka] / [..., H, Q, Kb], or None.
    scale: logit scale.

  Returns:
    fp32 [..., Q, H, D]. A query must see at least one key across the two sets.
  """
  s_a = _logits(q, k_a, scale, mask_a)
  s_b = _logits(q, k_b, scale, mask_b)
  # The result does not depend on the shift, so it carries no gradient; a set that is fully
  # masked for a row gives -inf, which the other set's max absorbs.
  shift = jax.lax.stop_gradient(jnp.maximum(s_a.max(axis=-1), s_b.max(axis=-1)))
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)[..., None]
  p_a = jnp.exp(s_a - shift)
  p_b = jnp.exp(s_b - shift)
  denom = p_a.sum(axis=-1) + p_b.sum(axis=-1)  # [..., H, Q]
  numer = _weighted_values(p_a, v_a) + _weighted_values(p_b, v_b)
  return numer / jnp.swapaxes(denom, -1, -2)[..., None]


def chunk_local_attention(q, k, v, *, scale=None):
  """Bidirectional attention within each chunk only.

  Args:
    q, k, v: [B, N, L, H, D].
    scale: logit scale; defaults to D**-0.5.

  Returns:
    [B, N, L, H, D] in q.dtype.
  """
  scale = _default_scale(q, scale)
  probs = jax.nn.softmax(_logits(q, k, scale, None), axis=-1)
  return _weighted_values(probs, v).astype(q.dtype)


# Cache keys per step of the blocked cached attention: its fp32 logits are [B, H, L, block],
# whatever the cache length (2048 keys x 4680 queries x 12 heads = 0.46 GB at paper shapes).
CACHE_KEY_BLOCK = 2048


def cached_chunk_attention(q, k, v, k_cache, v_cache, cache_valid, *, scale=None,
                           key_block=None):
  """One chunk attending to the valid cache slots and to all L keys of the chunk itself.

  A cache of at most `key_block` keys is scored at once. A longer one is swept in blocks of
  `key_block` keys with an online softmax (running max, denominator and weighted values; the
  flash-attention recurrence in plain XLA), so memory does not grow with the video: the
  temporaries are O(L x key_block), not O(L x M). Blocks without a valid slot are skipped. The
  block body is rematerialised, so gradients do not store every block's probabilities either.

  Args:
    q, k, v: [B, L, H, D].
    k_cache, v_cache: [B, M, H, D].
    cache_valid: bool [M] or [B, M]; invalid slots are ignored.
    scale: logit scale; defaults to D**-0.5.
    key_block: cache keys per block (a positive int); None reads `CACHE_KEY_BLOCK`.

  Returns:
    [B, L, H, D] in q.dtype.
  """
  scale = _default_scale(q, scale)
  cache_len = k_cache.shape[1]
  key_block = CACHE_KEY_BLOCK if key_block is None else key_block
  if key_block < 1:
    raise ValueError(f'{key_block=} must be positive')
  if cache_len <= key_block:
    cache_mask = cache_valid[..., None, None, :]  # [(B,) 1, 1, M] against [B, H, L, M]
    out = _two_key_set_attention(q, k_cache, v_cache, cache_mask, k, v, None, scale)
    return out.astype(q.dtype)

  # Start from the chunk's own keys: every query sees them, so the running max is finite.
  s_own = _logits(q, k, scale, None)  # [B, H, L, L]
  m = jax.lax.stop_gradient(s_own.max(axis=-1))  # [B, H, L]
  p_own = jnp.exp(s_own - m[..., None])
  init = (m, p_own.sum(axis=-1), _weighted_values(p_own, v))
  num_blocks = -(-cache_len // key_block)
  valid = jnp.broadcast_to(cache_valid, (q.shape[0], cache_len))

  def update(state, start, mask):
    m, l, acc = state
    k_blk = jax.lax.dynamic_slice_in_dim(k_cache, start, key_block, axis=1)
    v_blk = jax.lax.dynamic_slice_in_dim(v_cache, start, key_block, axis=1)
    s = _logits(q, k_blk, scale, mask[:, None, None, :])  # [B, H, L, block]
    m_new = jax.lax.stop_gradient(jnp.maximum(m, s.max(axis=-1)))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[..., None])
    l = alpha * l + p.sum(axis=-1)
    acc = jnp.swapaxes(alpha, -1, -2)[..., None] * acc + _weighted_values(p, v_blk)
    return m_new, l, acc

  @jax.checkpoint
  def block(state, i):
    # The last block is shifted back to end at the cache's end (no padding copy of the cache);
    # keys an earlier block already scored are masked out. A block with no valid key (the
    # unfilled part of a cache that grows by doubling) is skipped: the work follows the
    # history, not the capacity.
    start = jnp.minimum(i * key_block, cache_len - key_block)
    pos = start + jnp.arange(key_block)
    mask = jax.lax.dynamic_slice_in_dim(valid, start, key_block, axis=1) & (pos >= i * key_block)
    state = jax.lax.cond(jnp.any(mask), lambda st: update(st, start, mask), lambda st: st, state)
    return state, None

  (_, l, acc), _ = jax.lax.scan(block, init, jnp.arange(num_blocks))
  return (acc / jnp.swapaxes(l, -1, -2)[..., None]).astype(q.dtype)


def _check_divisible(seq_len, num_chunks):
  if num_chunks <= 0 or seq_len % num_chunks:
    raise ValueError(f'{seq_len=} must be a positive multiple of {num_chunks=}')


def teacher_forcing_attention(q_clean, k_clean, v_clean, q_noisy, k_noisy, v_noisy, *,
                              num_chunks, scale=None):
  """Teacher-forcing softmax attention over a clean and a noisy copy of N chunks.

  Clean chunk n attends to clean chunks <= n. Noisy chunk n attends to clean chunks < n and to
  noisy chunk n itself, under one softmax; noisy chunk 0 sees only itself.

  Every chunk scores all N * L clean keys (the later ones masked), which is simple but about
  twice the block-causal work; a blocked kernel can skip the masked blocks.

  Args:
    q_clean, k_clean, v_clean, q_noisy, k_noisy, v_noisy: [B, N * L, H, D].
    num_chunks: N.
    scale: logit scale; defaults to D**-0.5.

  Returns:
    (o_clean, o_noisy), each [B, N * L, H, D] in q.dtype.
  """
  batch, seq_len = q_clean.shape[:2]
  _check_divisible(seq_len, num_chunks)
  chunk_len = seq_len // num_chunks
  scale = _default_scale(q_clean, scale)

  chunks = lambda x: x.reshape(batch, num_chunks, chunk_len, *x.shape[2:])
  history_k, history_v = k_clean[:, None], v_clean[:, None]  # [B, 1, N*L, H, D]
  key_chunk = jnp.repeat(jnp.arange(num_chunks), chunk_len)
  # [N, 1, 1, N*L] against logits [B, N, H, L, N*L]: strictly earlier clean chunks.
  history_mask = (key_chunk[None, :] < jnp.arange(num_chunks)[:, None])[:, None, None, :]

  def attend(q, k_own, v_own):
    out = _two_key_set_attention(chunks(q), history_k, history_v, history_mask, chunks(k_own),
                                 chunks(v_own), None, scale)
    return out.reshape(q.shape).astype(q.dtype)

  return attend(q_clean, k_clean, v_clean), attend(q_noisy, k_noisy, v_noisy)
