# Kept in one file (~400 lines): the dense and blocked forms of each pattern share the logits,
# online-softmax and block helpers, and are read side by side.
"""Softmax attention for the ARL2 patterns in plain jnp: the XLA production path.

- `chunk_local_attention`: bidirectional attention within each chunk (the intra branch).
- `cached_chunk_attention`: one chunk attends to a K/V cache plus its own keys (sampling).
- `teacher_forcing_attention`: [clean ; noisy] training forward of the softmax layers.

The last two see two key sets (history, own chunk) under one softmax. Short key sets are
scored at once by `_two_key_set_attention`, which scores each set separately and normalises
with a shared max, so no dense mask over the concatenated keys is ever built. Long ones are
swept in key blocks with an online softmax (`_online_start`, `_online_step`, `_block_start`),
so the fp32 logits held at any time are O(queries x key block), whatever the video length:

    m' = max(m, rowmax s) ;  l = exp(m - m') l + rowsum exp(s - m')
    acc = exp(m - m') acc + exp(s - m') v ;  o = acc / l ;  lse = m + log l

The teacher-forcing sweep has a flash-style `jax.custom_vjp`: the backward recomputes each key
block's probabilities from the saved log-sum-exp, p = exp(s - lse), and

    dv += p^T do ;  dp = do v^T ;  ds = p (dp - rowsum(do o))
    dq += scale ds k ;  dk += scale ds^T q

so neither pass stores more than one block of logits. It visits only the blocks the
block-causal mask leaves non-empty (query chunk n: its own chunk and clean chunks < n).

Logits are fp32 (HIGHEST precision, fp32 accumulation); outputs are in q.dtype.
Shapes: B batch, H heads, D head dim, N chunks, L tokens per chunk, M cache slots; in the
teacher-forcing sweep a leading copy axis C = 2 stacks the clean and noisy queries of a chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels import common

_HIGHEST = jax.lax.Precision.HIGHEST

# Keys per step of the blocked sweeps (None in `AttentionBlockSizes.xla_key_block` reads
# these): the cache sweep's fp32 logits are [B, H, L, block] (2048 keys x 4680 queries x 12
# heads = 0.46 GB at paper shapes), the teacher-forcing sweep's [B, 2, H, L, block].
CACHE_KEY_BLOCK = 2048
LOCAL_KEY_BLOCK = 2048  # the hybrid layers' intra-chunk attention: [B, H, L, block] per step
TEACHER_FORCING_KEY_BLOCK = 2048


def _default_scale(q, scale):
  return q.shape[-1]**-0.5 if scale is None else scale


def _check_key_block(key_block):
  if not isinstance(key_block, int) or key_block < 1:
    raise ValueError(f'{key_block=} must be a positive integer')


def _logits(q, k, scale, mask):
  """q [..., Q, H, D], k [..., Kn, H, D] -> fp32 [..., H, Q, Kn], -inf where mask is False."""
  s = scale * jnp.einsum('...qhd,...khd->...hqk', q, k, precision=_HIGHEST,
                         preferred_element_type=jnp.float32)
  return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _weighted_values(p, v):
  """p [..., H, Q, Kn] (fp32), v [..., Kn, H, D] -> fp32 [..., Q, H, D]."""
  return jnp.einsum('...hqk,...khd->...qhd', p.astype(v.dtype), v, precision=_HIGHEST,
                    preferred_element_type=jnp.float32)


def _rows(x):
  """[..., H, Q] row statistics -> [..., Q, H, 1], to scale [..., Q, H, D] values."""
  return jnp.swapaxes(x, -1, -2)[..., None]


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
  return numer / _rows(denom)


# ---------------------------------------------------------------------------------------------
# The online-softmax pieces shared by the blocked sweeps.


def _block_start(i, num_keys, block):
  """Start of key block i (traced or static) of a sweep over `num_keys` keys in `block`s.

  The last block is shifted back to end at `num_keys` (no padding copy of the keys); the
  returned bool [block] mask is False for the keys an earlier block already scored.
  """
  start = jnp.minimum(i * block, num_keys - block)
  return start, start + jnp.arange(block) >= i * block


def _key_block(x, start, block):
  """The `block` keys of x [..., Kn, H, D] from `start` on."""
  return jax.lax.dynamic_slice_in_dim(x, start, block, axis=x.ndim - 3)


def _online_start(q, k, v, scale):
  """(m, l, acc) after keys every query sees (so the running max is finite)."""
  s = _logits(q, k, scale, None)
  m = jax.lax.stop_gradient(s.max(axis=-1))
  p = jnp.exp(s - m[..., None])
  return m, p.sum(axis=-1), _weighted_values(p, v)


def _online_step(state, q, k, v, scale, mask):
  """(m, l, acc) after one more key block k, v [..., block, H, D] under `mask`."""
  m, l, acc = state
  s = _logits(q, k, scale, mask)
  m_new = jax.lax.stop_gradient(jnp.maximum(m, s.max(axis=-1)))
  alpha = jnp.exp(m - m_new)
  p = jnp.exp(s - m_new[..., None])
  return m_new, alpha * l + p.sum(axis=-1), _rows(alpha) * acc + _weighted_values(p, v)


def chunk_local_attention(q, k, v, *, scale=None, key_block=None):
  """Bidirectional attention within each chunk only.

  A chunk of at most `key_block` keys is scored at once ([B, N, H, L, L] logits). A longer one
  (Wan: L = 4,680) is swept chunk by chunk and, within a chunk, in blocks of `key_block` keys
  with an online softmax; a flash-style custom VJP recomputes each block from the saved
  log-sum-exp, so neither pass keeps more than O(L x key_block) logits per chunk.

  Args:
    q, k, v: [B, N, L, H, D].
    scale: logit scale; defaults to D**-0.5.
    key_block: keys per block (a positive int); None reads `LOCAL_KEY_BLOCK`.

  Returns:
    [B, N, L, H, D] in q.dtype.
  """
  scale = _default_scale(q, scale)
  key_block = LOCAL_KEY_BLOCK if key_block is None else key_block
  _check_key_block(key_block)
  if q.shape[2] <= key_block:
    probs = jax.nn.softmax(_logits(q, k, scale, None), axis=-1)
    return _weighted_values(probs, v).astype(q.dtype)
  per_chunk = lambda x: jnp.moveaxis(x, 1, 0)  # [N, B, L, H, D]: one chunk per map step
  out = jax.lax.map(lambda qkv: _blocked_local(*qkv, scale, key_block),
                    (per_chunk(q), per_chunk(k), per_chunk(v)))
  return jnp.moveaxis(out, 0, 1)


def _local_tail(num_keys, key_block):
  """(full blocks, tail mask): the keys split into `full` whole blocks and, when key_block
  does not divide num_keys, one more block shifted back to end at num_keys whose static bool
  [block] mask keeps only the keys no whole block scored. Masks stay static (a traced per-block
  mask is hoisted out of the loop by XLA as one [blocks, ..., L, block] array)."""
  full, rest = divmod(num_keys, key_block)
  if not rest:
    return full, None
  return full, np.arange(key_block) >= key_block - rest


def _local_forward(q, k, v, scale, key_block):
  """One chunk, q k v [B, L, H, D] -> (out fp32 [B, L, H, D], lse fp32 [B, H, L])."""
  full, tail = _local_tail(k.shape[1], key_block)

  def step(state, start):
    return _online_step(state, q, _key_block(k, start, key_block),
                        _key_block(v, start, key_block), scale, None), None

  state = _online_start(q, _key_block(k, 0, key_block), _key_block(v, 0, key_block), scale)
  state, _ = jax.lax.scan(step, state, jnp.arange(1, full) * key_block)
  if tail is not None:
    start = k.shape[1] - key_block
    state = _online_step(state, q, _key_block(k, start, key_block),
                         _key_block(v, start, key_block), scale, tail)
  m, l, acc = state
  return acc / _rows(l), m + jnp.log(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _blocked_local(q, k, v, scale, key_block):
  return _local_forward(q, k, v, scale, key_block)[0].astype(q.dtype)


def _blocked_local_fwd(q, k, v, scale, key_block):
  out, lse = _local_forward(q, k, v, scale, key_block)
  out = out.astype(q.dtype)
  return out, (q, k, v, out, lse)


def _blocked_local_bwd(scale, key_block, residuals, d_out):
  """Flash backward: per key block, p = exp(s - lse) is recomputed; dq accumulates over the
  blocks, dk and dv of a block come from that block alone (the tail block's keys that a whole
  block scored are masked out, so their rows are zero)."""
  q, k, v, out, lse = residuals
  d_out = d_out.astype(jnp.float32)
  delta = jnp.einsum('blhd,blhd->bhl', d_out, out.astype(jnp.float32))  # rowsum(dO * O)
  full, tail = _local_tail(k.shape[1], key_block)

  def block_grads(dq, start, mask):
    kb, vb = _key_block(k, start, key_block), _key_block(v, start, key_block)
    p = jnp.exp(_logits(q, kb, scale, mask) - lse[..., None])  # [B, H, L, block]
    dv = jnp.einsum('bhqk,bqhd->bkhd', p, d_out, precision=_HIGHEST)
    dp = jnp.einsum('bqhd,bkhd->bhqk', d_out, vb.astype(jnp.float32), precision=_HIGHEST)
    ds = p * (dp - delta[..., None]) * scale
    dq = dq + jnp.einsum('bhqk,bkhd->bqhd', ds, kb.astype(jnp.float32), precision=_HIGHEST)
    dk = jnp.einsum('bhqk,bqhd->bkhd', ds, q.astype(jnp.float32), precision=_HIGHEST)
    return dq, (dk, dv)

  (dq0,), (delta, d_out) = common.zeros_after((delta, d_out), (q.shape, jnp.float32))
  dq, (dk, dv) = jax.lax.scan(lambda dq, start: block_grads(dq, start, None), dq0,
                              jnp.arange(full) * key_block)
  b, rest = q.shape[0], k.shape[1] - full * key_block
  tiles = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, full * key_block, *x.shape[3:])
  dk, dv = tiles(dk), tiles(dv)
  if tail is not None:  # the tail block's fresh rows are its last `rest`
    dq, (dk_t, dv_t) = block_grads(dq, k.shape[1] - key_block, tail)
    dk = jnp.concatenate([dk, dk_t[:, key_block - rest:]], axis=1)
    dv = jnp.concatenate([dv, dv_t[:, key_block - rest:]], axis=1)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_blocked_local.defvjp(_blocked_local_fwd, _blocked_local_bwd)


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
  _check_key_block(key_block)
  if cache_len <= key_block:
    cache_mask = cache_valid[..., None, None, :]  # [(B,) 1, 1, M] against [B, H, L, M]
    out = _two_key_set_attention(q, k_cache, v_cache, cache_mask, k, v, None, scale)
    return out.astype(q.dtype)

  # Start from the chunk's own keys: every query sees them, so the running max is finite.
  init = _online_start(q, k, v, scale)
  valid = jnp.broadcast_to(cache_valid, (q.shape[0], cache_len))

  @jax.checkpoint
  def block(state, i):
    # A block with no valid key (the unfilled part of a cache that grows by doubling) is
    # skipped: the work follows the history, not the capacity.
    start, fresh = _block_start(i, cache_len, key_block)
    mask = jax.lax.dynamic_slice_in_dim(valid, start, key_block, axis=1) & fresh
    update = lambda st: _online_step(st, q, _key_block(k_cache, start, key_block),
                                     _key_block(v_cache, start, key_block), scale,
                                     mask[:, None, None, :])
    return jax.lax.cond(jnp.any(mask), update, lambda st: st, state), None

  (_, l, acc), _ = jax.lax.scan(block, init, jnp.arange(-(-cache_len // key_block)))
  return (acc / _rows(l)).astype(q.dtype)


def _check_divisible(seq_len, num_chunks):
  if num_chunks <= 0 or seq_len % num_chunks:
    raise ValueError(f'{seq_len=} must be a positive multiple of {num_chunks=}')


def teacher_forcing_attention(q_clean, k_clean, v_clean, q_noisy, k_noisy, v_noisy, *,
                              num_chunks, scale=None, key_block=None):
  """Teacher-forcing softmax attention over a clean and a noisy copy of N chunks.

  Clean chunk n attends to clean chunks <= n. Noisy chunk n attends to clean chunks < n and to
  noisy chunk n itself, under one softmax; noisy chunk 0 sees only itself.

  When the whole clean sequence fits in one key block (N * L <= key_block) every chunk scores
  all N * L clean keys at once, the later ones masked (`_dense_teacher_forcing`: simple, fast
  at small shapes, differentiated by autodiff). Longer sequences take the blocked sweep with
  the flash-style custom VJP (`_blocked_teacher_forcing`), which visits only the key blocks
  the block-causal mask leaves non-empty and keeps O(L x key_block) logits per pass.

  Args:
    q_clean, k_clean, v_clean, q_noisy, k_noisy, v_noisy: [B, N * L, H, D].
    num_chunks: N.
    scale: logit scale; defaults to D**-0.5.
    key_block: keys per block of the sweep (a positive int); None reads
      `TEACHER_FORCING_KEY_BLOCK`.

  Returns:
    (o_clean, o_noisy), each [B, N * L, H, D] in q.dtype.
  """
  seq_len = q_clean.shape[1]
  _check_divisible(seq_len, num_chunks)
  scale = _default_scale(q_clean, scale)
  key_block = TEACHER_FORCING_KEY_BLOCK if key_block is None else key_block
  _check_key_block(key_block)
  args = (q_clean, k_clean, v_clean, q_noisy, k_noisy, v_noisy)
  if seq_len <= key_block:
    return _dense_teacher_forcing(*args, num_chunks=num_chunks, scale=scale)
  return _blocked_teacher_forcing(*args, num_chunks, float(scale), key_block)


def _dense_teacher_forcing(q_clean, k_clean, v_clean, q_noisy, k_noisy, v_noisy, *,
                           num_chunks, scale):
  """Every chunk scores all N * L clean keys (the later ones masked) and its own chunk."""
  batch, seq_len = q_clean.shape[:2]
  chunk_len = seq_len // num_chunks
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


# ---------------------------------------------------------------------------------------------
# The blocked teacher-forcing sweep. Query chunk n stacks its clean and noisy queries on a
# copy axis ([B, 2, L, H, D]). Each copy sees one contiguous range of key positions,
# [0, (n + 1) L): the clean copy reads clean keys throughout, the noisy copy clean keys before
# n L and its own noisy keys from n L on. One `lax.scan` walks a static schedule of
# (query chunk n, key block i) pairs, blocks of min(key_block, L) keys over [0, (n + 1) L),
# the last one shifted back to end there. So a block never covers a key the mask hides (the
# blocks the mask empties are never formed), the loop is sequential by construction (the
# chunks cannot be scheduled side by side), and the trip count is static (FLOP counts that
# multiply a scan body by its length stay exact).


def _schedule(num_chunks, chunk_len, key_block):
  """The block size and the static (query chunk, key block) pairs of the sweep."""
  block = min(key_block, chunk_len)
  pairs = [(n, i) for n in range(num_chunks)
           for i in range(-(-(n + 1) * chunk_len // block))]
  chunk, index = zip(*pairs)
  return block, jnp.asarray(chunk, jnp.int32), jnp.asarray(index, jnp.int32)


def _chunk_of(x, n, chunk_len, axis=1):
  """Chunk n (traced) of x along `axis`."""
  return jax.lax.dynamic_slice_in_dim(x, n * chunk_len, chunk_len, axis=axis)


def _copies(clean, noisy, n, chunk_len):
  """Chunk n of both copies, [B, N * L, ...] -> [B, 2, L, ...]."""
  return jnp.stack([_chunk_of(clean, n, chunk_len), _chunk_of(noisy, n, chunk_len)], axis=1)


def _key_blocks(k_clean, k_noisy, v_clean, v_noisy, n, i, chunk_len, block):
  """Key block i of query chunk n for both copies: k, v [B, 2, block, H, D], the mask of
  the keys no earlier block scored, the block's start and where the noisy copy's own keys
  (positions >= n L) are."""
  start, fresh = _block_start(i, (n + 1) * chunk_len, block)
  own = (start + jnp.arange(block) >= n * chunk_len)[:, None, None]   # [block, 1, 1]
  blocks = []
  for clean, noisy in ((k_clean, k_noisy), (v_clean, v_noisy)):
    clean_blk = _key_block(clean, start, block)
    noisy_blk = jnp.where(own, _key_block(noisy, start, block), clean_blk)
    blocks.append(jnp.stack([clean_blk, noisy_blk], axis=1))
  return (*blocks, fresh, start, own)


def _blocked_forward(inputs, num_chunks, scale, key_block):
  """((o_clean, o_noisy) in q.dtype, lse [B, 2, H, N * L] fp32) of the six inputs."""
  q_clean, k_clean, v_clean, q_noisy, k_noisy, v_noisy = inputs
  batch, seq_len, heads, head_dim = q_clean.shape
  chunk_len = seq_len // num_chunks
  block, chunks, indices = _schedule(num_chunks, chunk_len, key_block)
  rows = (batch, 2, heads, chunk_len)
  f32 = jnp.float32
  (l0, acc0, o0, lse0), inputs = common.zeros_after(
      inputs, (rows, f32), ((batch, 2, chunk_len, heads, head_dim), f32),
      ((batch, 2, seq_len, heads, head_dim), q_clean.dtype), ((batch, 2, heads, seq_len), f32))
  q_clean, k_clean, v_clean, q_noisy, k_noisy, v_noisy = inputs
  # A fresh chunk starts from m = -inf: its first block sees position 0, so m turns finite.
  init = (l0 - jnp.inf, l0, acc0)

  def step(carry, xs):
    state, o, lse = carry
    n, i = xs
    state = jax.tree.map(lambda a, b: jnp.where(i == 0, a, b), init, state)
    k, v, fresh, _, _ = _key_blocks(k_clean, k_noisy, v_clean, v_noisy, n, i, chunk_len,
                                    block)
    state = _online_step(state, _copies(q_clean, q_noisy, n, chunk_len), k, v, scale, fresh)
    m, l, acc = state
    # Written after every block; the chunk's last block leaves the final values.
    o = jax.lax.dynamic_update_slice_in_dim(o, (acc / _rows(l)).astype(o.dtype),
                                            n * chunk_len, axis=2)
    lse = jax.lax.dynamic_update_slice_in_dim(lse, m + jnp.log(l), n * chunk_len, axis=3)
    return (state, o, lse), None

  carry = (init, o0, lse0)
  (_, o, lse), _ = jax.lax.scan(step, carry, (chunks, indices))
  return (o[:, 0], o[:, 1]), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _blocked_teacher_forcing(q_clean, k_clean, v_clean, q_noisy, k_noisy, v_noisy,
                             num_chunks, scale, key_block):
  inputs = (q_clean, k_clean, v_clean, q_noisy, k_noisy, v_noisy)
  return _blocked_forward(inputs, num_chunks, scale, key_block)[0]


def _blocked_fwd(q_clean, k_clean, v_clean, q_noisy, k_noisy, v_noisy, num_chunks, scale,
                 key_block):
  inputs = (q_clean, k_clean, v_clean, q_noisy, k_noisy, v_noisy)
  outs, lse = _blocked_forward(inputs, num_chunks, scale, key_block)
  return outs, (inputs, outs, lse)


def _blocked_bwd(num_chunks, scale, key_block, residuals, cotangents):
  """The flash-style backward: the forward's schedule again, p recomputed from the lse."""
  inputs, (o_clean, o_noisy), lse = residuals
  q_clean, k_clean, v_clean, q_noisy, k_noisy, v_noisy = inputs
  do_clean, do_noisy = (x.astype(q_clean.dtype) for x in cotangents)
  seq_len = q_clean.shape[1]
  chunk_len = seq_len // num_chunks
  block, chunks, indices = _schedule(num_chunks, chunk_len, key_block)
  f32 = lambda x: x.astype(jnp.float32)
  mm = functools.partial(jnp.einsum, precision=_HIGHEST, preferred_element_type=jnp.float32)
  # rowsum(p * dp) = do . o for every query, [B, 2, H, N * L].
  delta = jnp.stack([jnp.sum(f32(do_clean) * f32(o_clean), axis=-1),
                     jnp.sum(f32(do_noisy) * f32(o_noisy), axis=-1)], axis=1)
  delta = jnp.swapaxes(delta, -1, -2)

  def add(acc, x, start, axis):
    return jax.lax.dynamic_update_slice_in_dim(
        acc, jax.lax.dynamic_slice_in_dim(acc, start, x.shape[axis], axis=axis) + x, start,
        axis=axis)

  def step(grads, xs):
    dq, dk_clean, dv_clean, dk_noisy, dv_noisy = grads
    n, i = xs
    q = _copies(q_clean, q_noisy, n, chunk_len)
    do = _copies(do_clean, do_noisy, n, chunk_len)
    k, v, fresh, start, own = _key_blocks(k_clean, k_noisy, v_clean, v_noisy, n, i,
                                          chunk_len, block)
    rows = lambda x: _chunk_of(x, n, chunk_len, axis=3)[..., None]    # [B, 2, H, L, 1]
    p = jnp.exp(_logits(q, k, scale, fresh) - rows(lse))              # [B, 2, H, L, block]
    ds = p * (mm('...qhd,...khd->...hqk', do, v) - rows(delta))
    dq = add(dq, scale * mm('...hqk,...khd->...qhd', ds.astype(k.dtype), k), n * chunk_len,
             axis=2)
    dk = scale * mm('...hqk,...qhd->...khd', ds.astype(q.dtype), q)   # [B, 2, block, H, D]
    dv = mm('...hqk,...qhd->...khd', p.astype(do.dtype), do)
    # The noisy copy's terms go to the clean keys before n L and to its own keys after.
    to_clean = lambda x: x[:, 0] + jnp.where(own, 0.0, x[:, 1])
    to_noisy = lambda x: jnp.where(own, x[:, 1], 0.0)
    return (dq, add(dk_clean, to_clean(dk), start, 1), add(dv_clean, to_clean(dv), start, 1),
            add(dk_noisy, to_noisy(dk), start, 1), add(dv_noisy, to_noisy(dv), start, 1)), None

  init, (delta, do_clean, do_noisy) = common.zeros_after(
      (delta, do_clean, do_noisy), ((q_clean.shape[0], 2, *q_clean.shape[1:]), jnp.float32),
      *[(k_clean.shape, jnp.float32)] * 4)
  (dq, dk_clean, dv_clean, dk_noisy, dv_noisy), _ = jax.lax.scan(step, init, (chunks, indices))
  grads = (dq[:, 0], dk_clean, dv_clean, dq[:, 1], dk_noisy, dv_noisy)
  return tuple(g.astype(x.dtype) for g, x in zip(grads, inputs))


_blocked_teacher_forcing.defvjp(_blocked_fwd, _blocked_bwd)
