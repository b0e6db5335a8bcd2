# Kept in one file (~470 lines): the WY and state kernels, their wrappers and the custom_vjp
# backward are one algorithm, read together.
"""Chunkwise (WY / UT transform) gated delta rule as Pallas kernels, with the fused ARL2 read.

K-first state h in R^{K x V}, fp32. For each token t:

    h <- exp(g_t) h ;  u_t = beta_t (v_t - h^T k_t) ;  h <- h + k_t u_t^T ;  o_t = h^T (scale q_t)

computed in sub-chunks of C tokens exactly as in `xla.py` (same algebra; b = cumsum(g) inside
a sub-chunk, Gamma_ij = exp(b_i - b_j) for i >= j with the diagonal, formed from segment sums):

    A_ij = beta_i (k_i . k_j) Gamma_ij (i > j) ;  T = (I + A)^-1
    W = T (beta exp(b) k) ;  U = T (beta v) ;  u = U - W h0
    h_next = exp(b_C) h0 + sum_j exp(b_C - b_j) k_j u_j^T
    o_i = scale (exp(b_i) q_i h0 + sum_{j <= i} (q_i . k_j) Gamma_ij u_j)

Two kernels:

1. `_wy_kernel`, grid (B, H, sub-chunks), all parallel: the segment sums (as a triangular
   matmul), A, T by forward substitution on the C x C unit-lower-triangular system, then W and
   U (and, for per-token outputs, scale exp(b) q and scale (q k^T) * Gamma).
2. `_state_kernel`, grid (B, H, V / block_v): the sequential part. The columns of h evolve
   independently, so each program carries a [K, block_v] slice of h in fp32 through every
   sub-chunk. For the ARL2 memory it stores h at each AR chunk boundary (prev_states) and fuses
   the read reads = scale q . h before writing the chunk; for `gated_delta_rule` it emits o.

Everything is fp32 inside the kernels (inputs may be bf16). Padding tokens (k = v = beta = g =
0) leave h unchanged, which is how L (or T) that is not a multiple of C is handled; K and V
that are not powers of two are zero-padded for the Triton lowering.

The backward is a `jax.custom_vjp` that recomputes through the XLA chunked path
(`jax.vjp` of `xla.chunk_arl2_memory` / `xla.chunk_gated_delta_rule`): exact to fp32
rounding, including the gradients through prev_states, final_state and initial_state, but
not a fused kernel.

Lowering: GPU through Pallas Triton, TPU through Mosaic; `interpret=True` runs on any backend.
On TPU the sequential kernel holds a whole (B, H) sequence of W, U and k (and the reading
queries) in VMEM, which bounds the tokens per call: `held_tokens` counts them, and a TPU call
above `GatedDeltaBlockSizes.max_tokens` raises (`check_tpu_tokens`; the API's
implementation=None sends such sequences to the XLA chunked path instead). One AR chunk at
paper scale fits; a 7-chunk teacher-forcing sequence does not.

Shapes: B batch, T tokens, H heads, K key dim, V value dim, C sub-chunk; for the ARL2 memory,
N autoregressive chunks, L tokens written per chunk, R reading tokens per chunk.
"""

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from kernels import common
from kernels.gated_delta import block_sizes as block_sizes_lib
from kernels.gated_delta import xla

_HIGHEST = lax.Precision.HIGHEST
_MIN_DIM = 16  # tl.dot needs >= 16 rows and columns


@dataclasses.dataclass(frozen=True)
class _Config:
  scale: float
  chunk_size: int
  sizes: block_sizes_lib.GatedDeltaBlockSizes
  target: str
  interpret: bool


def _dot(a, b, contract=((1,), (0,))):
  return lax.dot_general(a, b, (contract, ((), ())), precision=_HIGHEST,
                         preferred_element_type=jnp.float32)


# --------------------------------------------------------------------------------------------
# Kernel 1: per-sub-chunk WY / UT transform (parallel over sub-chunks).


def _wy_kernel(*refs, scale, with_outputs):
  """Refs (one sub-chunk): k [C, K], v [C, V], g_col [C, 1], g_row [1, C], beta_col [C, 1],
  beta_row [1, C], (q [C, K]) -> w [C, K], u0 [C, V], (q_decayed [C, K], qk_gamma [C, C])."""
  if with_outputs:
    k_ref, v_ref, g_col_ref, g_row_ref, beta_col_ref, beta_row_ref, q_ref, *outs = refs
    w_ref, u_ref, qd_ref, qkg_ref = outs
  else:
    k_ref, v_ref, g_col_ref, g_row_ref, beta_col_ref, beta_row_ref, w_ref, u_ref = refs
  k = k_ref[...].astype(jnp.float32)
  v = v_ref[...].astype(jnp.float32)
  g_col, g_row = g_col_ref[...], g_row_ref[...]
  beta_col, beta_row = beta_col_ref[...], beta_row_ref[...]
  c = k.shape[0]
  row = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  col = lax.broadcasted_iota(jnp.int32, (c, c), 1)
  ones = jnp.ones((c, c), jnp.float32)
  zeros = jnp.zeros((c, c), jnp.float32)

  # seg_t[j, i] = g_{j+1} + ... + g_i = b_i - b_j (i >= j, else 0), summed segment by segment
  # (a triangular matmul) rather than differenced, as in xla._segment_sums.
  g_after = jnp.where(col > row, g_row, zeros)        # [j, s] = g_s for s > j
  upto = jnp.where(row <= col, ones, zeros)           # [s, i] = 1 for s <= i
  seg_t = _dot(g_after, upto)
  gamma_t = jnp.where(row <= col, jnp.exp(seg_t), zeros)   # [j, i] = Gamma_ij
  kk = _dot(k, k, ((1,), (1,)))
  a_t = jnp.where(row < col, beta_row * kk * gamma_t, zeros)  # [j, i] = A_ij (kk symmetric)

  # T = (I + A)^-1 by forward substitution: row i of T is e_i - sum_{j<i} A_ij T_j, and rows
  # j < i are final when row i is formed. Rows and columns are picked with masks (no dynamic
  # indexing of values, which Triton does not have).
  def substitute(i, t):
    a_i = jnp.sum(jnp.where(col == i, a_t, zeros), axis=1, keepdims=True)  # [j, 1] = A_ij
    update = jnp.sum(a_i * t, axis=0, keepdims=True)                       # [1, C]
    return t - jnp.where(row == i, update, zeros)

  t = lax.fori_loop(1, c, substitute, jnp.where(row == col, ones, zeros))

  b_col = jnp.sum(jnp.where(col <= row, g_row, zeros), axis=1, keepdims=True)  # [i, 1] = b_i
  w_ref[...] = _dot(t, beta_col * jnp.exp(b_col) * k)
  u_ref[...] = _dot(t, beta_col * v)
  if with_outputs:
    q = q_ref[...].astype(jnp.float32)
    g_before = jnp.where(row > col, g_col, zeros)     # [s, j] = g_s for s > j
    upto_t = jnp.where(col <= row, ones, zeros)       # [i, s] = 1 for s <= i
    gamma = jnp.where(col <= row, jnp.exp(_dot(upto_t, g_before)), zeros)
    qd_ref[...] = scale * jnp.exp(b_col) * q
    qkg_ref[...] = scale * _dot(q, k, ((1,), (1,))) * gamma


def _wy_transform(k, v, g, beta, q, config):
  """k [B, H, T, K], v [B, H, T, V], g, beta [B, H, T] (fp32), q [B, H, T, K] or None;
  T % C == 0. Returns w, u0 (and q_decayed, qk_gamma) in fp32, token-major like the inputs."""
  batch, heads, seq_len, key_dim = k.shape
  value_dim = v.shape[-1]
  c = config.chunk_size
  num_sub = seq_len // c
  col = lambda x: x[..., None]                                   # [B, H, T, 1]
  row = lambda x: x.reshape(batch, heads, num_sub, 1, c)         # [B, H, NC, 1, C]
  tok_spec = lambda d: pl.BlockSpec((None, None, c, d), lambda b, h, j: (b, h, j, 0))
  row_spec = pl.BlockSpec((None, None, None, 1, c), lambda b, h, j: (b, h, j, 0, 0))
  inputs = [k, v, col(g), row(g), col(beta), row(beta)]
  in_specs = [tok_spec(key_dim), tok_spec(value_dim), tok_spec(1), row_spec, tok_spec(1),
              row_spec]
  out_shape = [jax.ShapeDtypeStruct((batch, heads, seq_len, key_dim), jnp.float32),
               jax.ShapeDtypeStruct((batch, heads, seq_len, value_dim), jnp.float32)]
  out_specs = [tok_spec(key_dim), tok_spec(value_dim)]
  if q is not None:
    inputs.append(q)
    in_specs.append(tok_spec(key_dim))
    out_shape += [jax.ShapeDtypeStruct((batch, heads, seq_len, key_dim), jnp.float32),
                  jax.ShapeDtypeStruct((batch, heads, seq_len, c), jnp.float32)]
    out_specs += [tok_spec(key_dim), tok_spec(c)]
  grid = (batch, heads, num_sub)
  return pl.pallas_call(
      functools.partial(_wy_kernel, scale=config.scale, with_outputs=q is not None),
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=common.pallas_compiler_params(config.target, config.sizes, len(grid)),
      interpret=config.interpret,
      name='arl2_gdn_wy',
  )(*inputs)


# --------------------------------------------------------------------------------------------
# Kernel 2: sequential state propagation (parallel over batch, heads and value blocks).


def _state_kernel(*refs, scale, chunk_size, num_chunks, subchunks_per_chunk, reads_per_chunk,
                  block_r, with_reads, with_outputs):
  """Refs (one batch, head and value block): w [T, K], u0 [T, bv], k [T, K], g_row
  [NC, 1, C], h0 [K, bv], then q_read [N * Rp, K] (reads) or q_decayed [T, K] and qk_gamma
  [T, C] (outputs); outputs reads [N * Rp, bv] and prev_states [N, K, bv], or o [T, bv];
  final_state [K, bv] last."""
  w_ref, u_ref, k_ref, g_row_ref, h0_ref, *rest = refs
  if with_reads:
    q_read_ref, reads_ref, prev_ref, final_ref = rest
  else:
    qd_ref, qkg_ref, o_ref, final_ref = rest
  c = chunk_size
  row = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  col = lax.broadcasted_iota(jnp.int32, (c, c), 1)
  zeros = jnp.zeros((c, c), jnp.float32)

  def sub_chunk(j, h):
    rows = pl.ds(pl.multiple_of(j * c, c), c)
    g_row = g_row_ref[j]                                                    # [1, C]
    # exp(b_C - b_j) as a segment sum, and the whole sub-chunk's decay exp(b_C).
    to_end = jnp.sum(jnp.where(col > row, g_row, zeros), axis=1, keepdims=True)  # [C, 1]
    decay = jnp.exp(jnp.sum(g_row))
    u = u_ref[rows, :] - _dot(w_ref[rows, :], h)
    if with_outputs:
      o = _dot(qd_ref[rows, :], h) + _dot(qkg_ref[rows, :], u)
      o_ref[rows, :] = o.astype(o_ref.dtype)
    k_to_end = jnp.exp(to_end) * k_ref[rows, :].astype(jnp.float32)
    return decay * h + _dot(k_to_end, u, ((0,), (0,)))

  def ar_chunk(n, h):
    if with_reads:
      prev_ref[n] = h

      def read(r, carry):
        rows = pl.ds(pl.multiple_of(n * reads_per_chunk + r * block_r, block_r), block_r)
        reads_ref[rows, :] = (scale * _dot(q_read_ref[rows, :].astype(jnp.float32), h)
                              ).astype(reads_ref.dtype)
        return carry

      lax.fori_loop(0, reads_per_chunk // block_r, read, 0)
    first = n * subchunks_per_chunk
    return lax.fori_loop(first, first + subchunks_per_chunk, sub_chunk, h)

  h = lax.fori_loop(0, num_chunks, ar_chunk, h0_ref[...].astype(jnp.float32))
  final_ref[...] = h


def _propagate(w, u0, k, g, h0, q_read, q_decayed, qk_gamma, *, num_chunks, reads_per_chunk,
               block_r, out_dtype, config):
  """Runs the state kernel. Arrays are [B, H, T, .] with T = N * (tokens per AR chunk)."""
  batch, heads, seq_len, key_dim = k.shape
  value_dim = u0.shape[-1]
  c = config.chunk_size
  num_sub = seq_len // c
  block_v = config.sizes.block_v or value_dim
  block_v = min(block_v, value_dim)
  if value_dim % block_v:
    raise ValueError(f'{value_dim=} must be a multiple of {block_v=}')
  with_reads = q_read is not None
  grid = (batch, heads, value_dim // block_v)
  full = lambda rows, cols: pl.BlockSpec((None, None, rows, cols), lambda b, h, i: (b, h, 0, 0))
  v_cols = lambda rows: pl.BlockSpec((None, None, rows, block_v), lambda b, h, i: (b, h, 0, i))
  g_row = g.reshape(batch, heads, num_sub, 1, c)
  inputs = [w, u0, k, g_row, h0]
  in_specs = [full(seq_len, key_dim), v_cols(seq_len), full(seq_len, key_dim),
              pl.BlockSpec((None, None, num_sub, 1, c), lambda b, h, i: (b, h, 0, 0, 0)),
              v_cols(key_dim)]
  if with_reads:
    num_reads = q_read.shape[2]
    inputs.append(q_read)
    in_specs.append(full(num_reads, key_dim))
    out_shape = [jax.ShapeDtypeStruct((batch, heads, num_reads, value_dim), out_dtype),
                 jax.ShapeDtypeStruct((batch, heads, num_chunks, key_dim, value_dim),
                                      jnp.float32)]
    out_specs = [v_cols(num_reads),
                 pl.BlockSpec((None, None, num_chunks, key_dim, block_v),
                              lambda b, h, i: (b, h, 0, 0, i))]
  else:
    inputs += [q_decayed, qk_gamma]
    in_specs += [full(seq_len, key_dim), full(seq_len, c)]
    out_shape = [jax.ShapeDtypeStruct((batch, heads, seq_len, value_dim), out_dtype)]
    out_specs = [v_cols(seq_len)]
  out_shape.append(jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32))
  out_specs.append(v_cols(key_dim))
  kernel = functools.partial(
      _state_kernel, scale=config.scale, chunk_size=c, num_chunks=num_chunks,
      subchunks_per_chunk=num_sub // num_chunks, reads_per_chunk=reads_per_chunk,
      block_r=block_r, with_reads=with_reads, with_outputs=not with_reads)
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=common.pallas_compiler_params(config.target, config.sizes, len(grid)),
      interpret=config.interpret,
      name='arl2_gdn_state',
  )(*inputs)


# --------------------------------------------------------------------------------------------
# Forward wrappers: layout, padding, and the custom_vjp.


def _padded_dims(key_dim, value_dim, config):
  if config.target != 'gpu':
    return key_dim, value_dim
  return (max(_MIN_DIM, pl.next_power_of_2(key_dim)),
          max(_MIN_DIM, pl.next_power_of_2(value_dim)))


def _arl2_forward(q, k, v, g, beta, h0, config):
  batch, num_chunks, num_reads, heads, key_dim = q.shape
  chunk_len, value_dim = k.shape[2], v.shape[-1]
  c = config.chunk_size
  key_pad, value_pad = _padded_dims(key_dim, value_dim, config)
  padded_len = common.round_up(chunk_len, c)
  floor = _MIN_DIM if config.target == 'gpu' else 8
  block_r = max(floor, min(config.sizes.block_r, pl.next_power_of_2(num_reads)))
  reads_pad = common.round_up(num_reads, block_r)

  def tokens(x, length, feat_pad=None):
    """[B, N, len, H(, F)] -> [B, H, N * length(, feat_pad)], zero-padded."""
    x = common.pad_axis(x, 2, length)
    if feat_pad is not None:
      x = common.pad_axis(x, 4, feat_pad)
    x = x.reshape(batch, num_chunks * length, *x.shape[3:])
    return jnp.swapaxes(x, 1, 2)

  k_t = tokens(k, padded_len, key_pad)
  v_t = tokens(v, padded_len, value_pad)
  g_t = tokens(g.astype(jnp.float32), padded_len)
  beta_t = tokens(beta.astype(jnp.float32), padded_len)
  q_t = tokens(q, reads_pad, key_pad)
  h0_t = common.pad_axis(common.pad_axis(h0, 2, key_pad), 3, value_pad)
  w, u0 = _wy_transform(k_t, v_t, g_t, beta_t, None, config)
  reads, prev_states, final_state = _propagate(
      w, u0, k_t, g_t, h0_t, q_t, None, None, num_chunks=num_chunks,
      reads_per_chunk=reads_pad, block_r=block_r, out_dtype=v.dtype, config=config)
  reads = jnp.swapaxes(reads, 1, 2).reshape(batch, num_chunks, reads_pad, heads, value_pad)
  reads = reads[:, :, :num_reads, :, :value_dim]
  prev_states = jnp.swapaxes(prev_states, 1, 2)[..., :key_dim, :value_dim]
  return reads, prev_states, final_state[..., :key_dim, :value_dim]


def _gdn_forward(q, k, v, g, beta, h0, config):
  batch, seq_len, heads, key_dim = q.shape
  value_dim = v.shape[-1]
  c = config.chunk_size
  key_pad, value_pad = _padded_dims(key_dim, value_dim, config)
  padded_len = common.round_up(seq_len, c)

  def tokens(x, feat_pad=None):
    x = common.pad_axis(x, 1, padded_len)
    if feat_pad is not None:
      x = common.pad_axis(x, 3, feat_pad)
    return jnp.swapaxes(x, 1, 2)

  k_t, v_t, q_t = tokens(k, key_pad), tokens(v, value_pad), tokens(q, key_pad)
  g_t, beta_t = tokens(g.astype(jnp.float32)), tokens(beta.astype(jnp.float32))
  h0_t = common.pad_axis(common.pad_axis(h0, 2, key_pad), 3, value_pad)
  w, u0, q_decayed, qk_gamma = _wy_transform(k_t, v_t, g_t, beta_t, q_t, config)
  o, final_state = _propagate(
      w, u0, k_t, g_t, h0_t, None, q_decayed, qk_gamma, num_chunks=1, reads_per_chunk=0,
      block_r=8, out_dtype=v.dtype, config=config)
  o = jnp.swapaxes(o, 1, 2)[:, :seq_len, :, :value_dim]
  return o, final_state[..., :key_dim, :value_dim]


def _chunk_arl2(q, k, v, g, beta, h0, config):
  return xla.chunk_arl2_memory(q, k, v, g, beta, initial_state=h0, scale=config.scale,
                               chunk_size=config.chunk_size)


def _chunk_gdn(q, k, v, g, beta, h0, config):
  return xla.chunk_gated_delta_rule(q, k, v, g, beta, scale=config.scale, initial_state=h0,
                                    chunk_size=config.chunk_size)


def _with_recomputed_vjp(forward, chunked):
  """custom_vjp: `forward` (Pallas) in the primal, jax.vjp of `chunked` (XLA) in the backward."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
  def fn(q, k, v, g, beta, h0, config):
    return forward(q, k, v, g, beta, h0, config)

  def fwd(q, k, v, g, beta, h0, config):
    return forward(q, k, v, g, beta, h0, config), (q, k, v, g, beta, h0)

  def bwd(config, residuals, cotangents):
    _, vjp = jax.vjp(functools.partial(chunked, config=config), *residuals)
    return vjp(cotangents)

  fn.defvjp(fwd, bwd)
  return fn


_arl2 = _with_recomputed_vjp(_arl2_forward, _chunk_arl2)
_gdn = _with_recomputed_vjp(_gdn_forward, _chunk_gdn)


def held_tokens(num_chunks, chunk_len, num_reads):
  """Tokens of one (batch, head) the TPU state kernel holds in VMEM: N chunks of L written
  tokens and R reading queries each (a `gated_delta_rule` token is written and read)."""
  return num_chunks * (chunk_len + num_reads)


def fits_tpu(num_tokens, sizes):
  """Whether `num_tokens` held tokens are within `sizes.max_tokens` (None: no limit)."""
  return sizes.max_tokens is None or num_tokens <= sizes.max_tokens


def check_tpu_tokens(num_tokens, sizes):
  """Raises unless one TPU call holding `num_tokens` tokens is within `sizes.max_tokens`."""
  if not fits_tpu(num_tokens, sizes):
    raise ValueError(
        f'{num_tokens=} (written tokens plus reading queries per batch and head) must be <= '
        f'max_tokens={sizes.max_tokens} for the Pallas TPU gated-delta kernel, which holds a '
        "whole (batch, head) sequence in VMEM. Use implementation='xla' (None routes such "
        'sequences there), or a GatedDeltaBlockSizes with a larger max_tokens')


def _make_config(q, k, scale, chunk_size, block_sizes, interpret, target, num_tokens,
                 vmem_tokens):
  target = common.resolve_target(target, interpret, op='gated-delta')
  key_dim = q.shape[-1]
  if not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f'{chunk_size=} must be a positive integer')
  if target == 'gpu' and (not common.is_power_of_two(chunk_size) or chunk_size < _MIN_DIM):
    raise ValueError(f'{chunk_size=} must be a power of two >= {_MIN_DIM} for the Pallas '
                     'Triton (GPU) kernel')
  if target == 'tpu' and chunk_size % 8:
    raise ValueError(f'{chunk_size=} must be a multiple of 8 for the Pallas TPU kernel')
  if block_sizes is None:
    block_sizes = block_sizes_lib.get_block_sizes(k.dtype, num_tokens, interpret=interpret)
  if target == 'tpu':
    check_tpu_tokens(vmem_tokens, block_sizes)
  if scale is None:
    scale = key_dim**-0.5
  return _Config(scale=float(scale), chunk_size=chunk_size, sizes=block_sizes, target=target,
                 interpret=bool(interpret))


def _state_or_zeros(initial_state, batch, heads, key_dim, value_dim):
  if initial_state is None:
    return jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)
  return initial_state.astype(jnp.float32)


def arl2_memory(q, k, v, g, beta, *, initial_state=None, scale=None, chunk_size=64,
                block_sizes=None, interpret=False, target=None):
  """ARL2 memory (same contract as `reference.arl2_memory_reference`), Pallas forward.

  Args:
    q: [B, N, R, H, K] reading queries.
    k: [B, N, L, H, K].
    v: [B, N, L, H, V].
    g, beta: [B, N, L, H].
    initial_state: [B, H, K, V] or None (zeros).
    scale: multiplies q; defaults to K**-0.5.
    chunk_size: C; a power of two >= 16 for the GPU kernel. L need not be a multiple of it.
    block_sizes: `GatedDeltaBlockSizes`, or None for the tuned/default ones.
    interpret: run the kernels in Pallas interpret mode (any backend, slow).
    target: 'gpu' or 'tpu' lowering; None picks the local platform ('gpu' constraints in
      interpret mode on CPU).

  Returns:
    reads [B, N, R, H, V] in v.dtype, prev_states [B, N, H, K, V] fp32 (the state each chunk
    reads), final_state [B, H, K, V] fp32.
  """
  batch, num_chunks, num_reads, heads, key_dim = q.shape
  config = _make_config(q, k, scale, chunk_size, block_sizes, interpret, target,
                        k.shape[2] * num_chunks, held_tokens(num_chunks, k.shape[2], num_reads))
  h0 = _state_or_zeros(initial_state, batch, heads, key_dim, v.shape[-1])
  return _arl2(q, k, v, g, beta, h0, config)


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, chunk_size=64,
                     block_sizes=None, interpret=False, target=None):
  """Gated delta rule with per-token outputs (contract of
  `reference.naive_recurrent_gated_delta_rule`), Pallas forward.

  Args:
    q, k: [B, T, H, K]; v: [B, T, H, V]; g, beta: [B, T, H].
    scale, initial_state, chunk_size, block_sizes, interpret, target: as in `arl2_memory`.

  Returns:
    o [B, T, H, V] in v.dtype and final_state [B, H, K, V] fp32.
  """
  batch, seq_len, heads, key_dim = q.shape
  config = _make_config(q, k, scale, chunk_size, block_sizes, interpret, target, seq_len,
                        held_tokens(1, seq_len, seq_len))
  h0 = _state_or_zeros(initial_state, batch, heads, key_dim, v.shape[-1])
  return _gdn(q, k, v, g, beta, h0, config)


def gdn_flops(batch, heads, num_tokens, key_dim, value_dim, chunk_size, num_reads=0):
  """Approximate forward FLOPs of the chunked algorithm (matmuls only), for TFLOP/s."""
  c = chunk_size
  per_sub_chunk = (2 * c * c * c  # segment sums
                   + 2 * c * c * key_dim  # k k^T
                   + 2 * c * c * (key_dim + value_dim)  # W and U
                   + 2 * c * key_dim * value_dim * 2)  # u and the state update
  num_sub = -(-num_tokens // c)
  return batch * heads * (num_sub * per_sub_chunk + 2 * num_reads * key_dim * value_dim)
