"""Chunkwise (WY / UT transform) gated delta rule in plain jnp: the XLA production path.

K-first state h in R^{K x V}, fp32. The recurrence, for each token t:

    h <- exp(g_t) h ;  u_t = beta_t (v_t - h^T k_t) ;  h <- h + k_t u_t^T ;  o_t = h^T (scale q_t)

is computed in sub-chunks of C tokens. Inside a sub-chunk, with b = cumsum(g) and h0 the state
at its start:

    A_ij = beta_i (k_i . k_j) exp(b_i - b_j)  for i > j, else 0;   T = (I + A)^-1
    W = T (beta exp(b) k);   U = T (beta v);   u = U - W h0
    o_i = scale (exp(b_i) q_i h0 + sum_{j <= i} (q_i . k_j) exp(b_i - b_j) u_j)
    h_next = exp(b_C) h0 + sum_j exp(b_C - b_j) k_j u_j^T

The intra-chunk mask is the decay matrix Gamma_ij = exp(b_i - b_j) for i >= j, diagonal included
(the GDN erratum). b_i - b_j is summed segment by segment rather than differenced (see
`_segment_sums`), which keeps d/dg accurate under strong decay. Tokens with
k = v = beta = g = 0 leave h unchanged, which is how lengths that are not a multiple of C are
padded.

A, T, W and U are formed for all sub-chunks at once; only the state propagation (and the
outputs that need it) runs in a `lax.scan` over sub-chunks.

Shapes: B batch, T tokens, H heads, K key dim, V value dim, C sub-chunk size; for the ARL2
memory, N autoregressive chunks, L tokens written per chunk, R reading tokens per chunk.
"""

import functools

import jax
import jax.numpy as jnp

from kernels import common

_HIGHEST = jax.lax.Precision.HIGHEST
_einsum = functools.partial(jnp.einsum, precision=_HIGHEST)


def _check_chunk_size(chunk_size):
  if not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f'{chunk_size=} must be a positive integer')


def _to_subchunks(x, chunk_size):
  """[B, T, H, ...] with T % C == 0 -> [T // C, B, H, C, ...] in fp32, sub-chunk major."""
  batch, seq_len, heads = x.shape[:3]
  x = x.astype(jnp.float32).reshape(batch, seq_len // chunk_size, chunk_size, heads, *x.shape[3:])
  return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 2, 3)


def _from_subchunks(x):
  """[NC, B, H, C, V] -> [B, NC * C, H, V]."""
  num_sub, batch, heads, chunk_size, value_dim = x.shape
  x = jnp.transpose(x, (1, 0, 3, 2, 4))
  return x.reshape(batch, num_sub * chunk_size, heads, value_dim)


def _segment_sums(g):
  """seg[..., i, j] = g_{j+1} + ... + g_i = b_i - b_j for i >= j, and 0 for i < j.

  g: [..., C] -> [..., C, C]. Summing each segment directly, rather than differencing the
  cumulative sum b, keeps exp(b_i - b_j) accurate when |b| is large and, more importantly,
  keeps d/dg accurate under strong decay: differencing b makes the O(1) diagonal terms
  (exp(b_i - b_i) = 1) feed opposite gradients into b_i that cancel only to rounding, which
  swamps the true d/dg. Masked entries are 0, never a large positive difference, so exp()
  stays finite and masked gradients stay zero for any g.
  """
  chunk_size = g.shape[-1]
  idx = jnp.arange(chunk_size)
  after = idx[:, None] > idx[None, :]  # [s, j]: token s comes after token j
  return jnp.cumsum(jnp.where(after, g[..., :, None], 0.0), axis=-2)


def _decay_matrix(seg):
  """Gamma_ij = exp(b_i - b_j) for i >= j (diagonal included), else 0."""
  chunk_size = seg.shape[-1]
  causal = jnp.tril(jnp.ones((chunk_size, chunk_size), dtype=bool))
  return jnp.where(causal, jnp.exp(seg), 0.0)


def _write_terms(k, v, g, beta):
  """Per-sub-chunk terms of the state update, for all sub-chunks at once.

  Args (sub-chunk major, fp32): k [NC, B, H, C, K], v [NC, B, H, C, V], g, beta [NC, B, H, C].

  Returns:
    w [NC, B, H, C, K], u0 [NC, B, H, C, V] (so that u = u0 - w h0), k_to_end
    [NC, B, H, C, K] = exp(b_C - b_j) k_j, chunk_decay [NC, B, H] = exp(b_C), the cumulative
    log decay b [NC, B, H, C] and the decay matrix Gamma [NC, B, H, C, C].
  """
  chunk_size, key_dim = k.shape[-2:]
  b = jnp.cumsum(g, axis=-1)
  seg = _segment_sums(g)
  gamma = _decay_matrix(seg)
  strictly_lower = jnp.tril(jnp.ones((chunk_size, chunk_size), dtype=bool), -1)
  kk = _einsum('...ik,...jk->...ij', k, k)
  a = jnp.where(strictly_lower, beta[..., :, None] * kk * gamma, 0.0)
  rhs = jnp.concatenate([(beta * jnp.exp(b))[..., None] * k, beta[..., None] * v], axis=-1)
  # T @ rhs with T = (I + A)^-1, as one unit-lower-triangular solve for W and U together.
  solved = unit_lower_solve(a, rhs)
  w, u0 = solved[..., :key_dim], solved[..., key_dim:]
  k_to_end = gamma[..., -1, :, None] * k  # exp(b_C - b_j) k_j
  chunk_decay = jnp.exp(b[..., -1])
  return w, u0, k_to_end, chunk_decay, b, gamma


_SOLVE_BLOCK = 16


def unit_lower_solve(a, rhs):
  """X = (I + A)^-1 rhs for strictly lower-triangular A [..., C, C], batched over leading axes.

  Blocked forward substitution: the diagonal blocks (I + A_bb) of size `_SOLVE_BLOCK` are
  inverted by row substitution on the small blocks only, then block row b is
  X_b = (I + A_bb)^-1 (rhs_b - A_b,<b X_<b), all matrix products. (LAPACK's batched trsm on CPU
  stalls for seconds at times and can starve fake-device threads that wait at a collective; a
  row-by-row substitution over the whole [C, D] right-hand side is memory-bound: both are
  several times slower here.)
  """
  chunk_size = a.shape[-1]
  bs = _SOLVE_BLOCK
  if chunk_size <= bs or chunk_size % bs:
    return _row_substitution(a, rhs)
  nb = chunk_size // bs
  blocks = a.reshape(*a.shape[:-2], nb, bs, nb, bs)
  diag = jnp.stack([blocks[..., i, :, i, :] for i in range(nb)], axis=-3)  # [..., nb, bs, bs]
  eye = jnp.broadcast_to(jnp.eye(bs, dtype=a.dtype), diag.shape)
  inv_diag = _row_substitution(diag, eye)                                  # (I + A_bb)^-1
  xs = []
  for i in range(nb):
    r = rhs[..., i * bs:(i + 1) * bs, :]
    if i:
      r = r - _einsum('...ij,...jd->...id', a[..., i * bs:(i + 1) * bs, :i * bs],
                      jnp.concatenate(xs, axis=-2))
    xs.append(_einsum('...ij,...jd->...id', inv_diag[..., i, :, :], r))
  return jnp.concatenate(xs, axis=-2)


def _row_substitution(a, rhs):
  """X = (I + A)^-1 rhs by row-by-row forward substitution (a fori_loop of C steps).

  Row i: X_i = rhs_i - sum_{j<i} A_ij X_j.
  """
  def row(i, x):
    a_i = jax.lax.dynamic_index_in_dim(a, i, axis=-2, keepdims=False)       # [..., C]
    r_i = jax.lax.dynamic_index_in_dim(rhs, i, axis=-2, keepdims=False)     # [..., D]
    x_i = r_i - _einsum("...j,...jd->...d", a_i, x)
    return jax.lax.dynamic_update_index_in_dim(x, x_i, i, axis=-2)

  return jax.lax.fori_loop(0, a.shape[-1], row, jnp.zeros_like(rhs))


def _state_update(h, w, u0, k_to_end, chunk_decay):
  """One sub-chunk of the write. h: [B, H, K, V]. Returns (u, h_next)."""
  u = u0 - _einsum('bhck,bhkv->bhcv', w, h)
  h_next = chunk_decay[..., None, None] * h + _einsum('bhck,bhcv->bhkv', k_to_end, u)
  return u, h_next


def _initial_state(initial_state, batch, heads, key_dim, value_dim):
  if initial_state is None:
    return jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)
  return initial_state.astype(jnp.float32)


def chunk_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, chunk_size=64):
  """Gated delta rule in chunkwise form; same contract as `naive_recurrent_gated_delta_rule`.

  Args:
    q, k: [B, T, H, K].
    v: [B, T, H, V].
    g, beta: [B, T, H].
    scale: multiplies q; defaults to K**-0.5.
    initial_state: [B, H, K, V] or None (zeros).
    chunk_size: C, the sub-chunk length; T need not be a multiple of it.

  Returns:
    o: [B, T, H, V] in v.dtype, and final_state: [B, H, K, V] in fp32.
  """
  _check_chunk_size(chunk_size)
  batch, seq_len, heads, key_dim = q.shape
  value_dim = v.shape[-1]
  if scale is None:
    scale = key_dim**-0.5
  out_dtype = v.dtype
  padded_len = common.round_up(seq_len, chunk_size)
  q, k, v, g, beta = (
      _to_subchunks(common.pad_axis(x, 1, padded_len), chunk_size) for x in (q, k, v, g, beta))

  w, u0, k_to_end, chunk_decay, b, gamma = _write_terms(k, v, g, beta)
  q = scale * q
  q_decayed = jnp.exp(b)[..., None] * q
  qk = _einsum('...ik,...jk->...ij', q, k) * gamma

  def step(h, xs):
    w_n, u0_n, k_to_end_n, chunk_decay_n, q_decayed_n, qk_n = xs
    u, h_next = _state_update(h, w_n, u0_n, k_to_end_n, chunk_decay_n)
    o = _einsum('bhck,bhkv->bhcv', q_decayed_n, h) + _einsum('bhij,bhjv->bhiv', qk_n, u)
    return h_next, o

  h0 = _initial_state(initial_state, batch, heads, key_dim, value_dim)
  final_state, o = jax.lax.scan(step, h0, (w, u0, k_to_end, chunk_decay, q_decayed, qk))
  o = _from_subchunks(o)[:, :seq_len]
  return o.astype(out_dtype), final_state


def _boundary_states(h0, write_terms, num_chunks):
  """Runs the write over all sub-chunks; returns (final_state, state before each AR chunk).

  write_terms are sub-chunk major with NC = num_chunks * m; per-token outputs are never formed.
  """
  per_chunk = tuple(x.reshape(num_chunks, -1, *x.shape[1:]) for x in write_terms)

  def sub_chunk_step(h, xs):
    _, h_next = _state_update(h, *xs)
    return h_next, None

  def chunk_step(h, xs):
    h_next, _ = jax.lax.scan(sub_chunk_step, h, xs)
    return h_next, h

  final_state, prev_states = jax.lax.scan(chunk_step, h0, per_chunk)
  return final_state, jnp.moveaxis(prev_states, 0, 1)


def chunk_arl2_memory(q, k, v, g, beta, *, initial_state=None, scale=None, chunk_size=64):
  """ARL2 block-level read and write; same contract as `arl2_memory_reference`.

  Each AR chunk's L tokens are zero-padded to a multiple of C (padding leaves h unchanged), the
  N chunks are flattened into one sequence for a single chunked write, and the states at AR
  chunk boundaries are read with one einsum.

  Args:
    q: [B, N, R, H, K] reading queries.
    k: [B, N, L, H, K].
    v: [B, N, L, H, V].
    g, beta: [B, N, L, H].
    initial_state: [B, H, K, V] or None (zeros).
    scale: multiplies q; defaults to K**-0.5.
    chunk_size: C, the sub-chunk length; L need not be a multiple of it.

  Returns:
    reads: [B, N, R, H, V] in v.dtype;
    prev_states: [B, N, H, K, V] fp32, the state before each chunk;
    final_state: [B, H, K, V] fp32.
  """
  _check_chunk_size(chunk_size)
  batch, num_chunks, _, heads, key_dim = q.shape
  chunk_len = k.shape[2]
  value_dim = v.shape[-1]
  if scale is None:
    scale = key_dim**-0.5
  out_dtype = v.dtype
  padded_len = common.round_up(chunk_len, chunk_size)

  def flatten(x):
    x = common.pad_axis(x, 2, padded_len)
    return _to_subchunks(x.reshape(batch, num_chunks * padded_len, *x.shape[3:]), chunk_size)

  k, v, g, beta = (flatten(x) for x in (k, v, g, beta))
  w, u0, k_to_end, chunk_decay, _, _ = _write_terms(k, v, g, beta)
  h0 = _initial_state(initial_state, batch, heads, key_dim, value_dim)
  final_state, prev_states = _boundary_states(h0, (w, u0, k_to_end, chunk_decay), num_chunks)
  reads = _einsum('bnrhk,bnhkv->bnrhv', scale * q.astype(jnp.float32), prev_states)
  return reads.astype(out_dtype), prev_states, final_state
