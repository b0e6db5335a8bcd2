# Kept in one file (~400 lines): one flash kernel, its log-sum-exp merge and its recompute
# backward are read together.
"""Flash-attention (online softmax) Pallas kernel for the ARL2 attention patterns.

One kernel, `flash_attention`, attends a query set to one key set under three optional masks:
padding (key index >= the true key count), a per-key validity vector (the K/V cache mask) and a
chunk-history mask (query t sees key s only when s < chunk_len * (t // chunk_len), i.e. the
clean chunks strictly before its own). It returns the normalised output and the per-row
log-sum-exp, so that attention over several key sets under ONE softmax is the log-sum-exp
merge of per-set calls (`merge_attention`), with no concatenated keys and no dense mask:

- `chunk_local_attention`: chunks folded into the batch, one call.
- `cached_chunk_attention`: merge(cache with validity mask, own chunk).
- `teacher_forcing_attention`: for clean and noisy queries alike,
  merge(clean keys under the history mask, own chunk), which is exactly "clean chunk n sees
  clean <= n; noisy chunk n sees clean < n and noisy chunk n".

Per query block (a grid program) the kernel loops over key blocks:

    s = scale q k^T (masked) ;  m' = max(m, rowmax s) ;  p = exp(s - m')
    l = exp(m - m') l + rowsum p ;  acc = exp(m - m') acc + p v ;  o = acc / l ; lse = m + log l

Rows that see no key give o = 0 and lse = -inf (the merge then gives them zero weight). Under
the history mask the loop stops at the last visible key block. Token counts that are not a
multiple of the block are zero-padded here and masked in the kernel.

Lowering: GPU through Pallas Triton (layout [B, T, H, D], no transposes), TPU through Mosaic
(layout [B, H, T, D]; key sets longer than `max_kv_per_call` run as several calls merged by
log-sum-exp, since a program's keys live in VMEM). `interpret=True` runs either layout on any
backend. The backward is a `jax.custom_vjp` that recomputes softmax in plain jnp from the saved
log-sum-exp and output, flash-style: `bwd_block_q` x `bwd_block_k` logits at a time, over the
(query block, key block) pairs the history mask leaves non-empty (exact, but not a fused
kernel).

Shapes: B batch, H heads, D head dim, N chunks, L tokens per chunk, M cache slots; Tq / Tk
query / key counts of one call.
"""

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp
import numpy as np

from kernels import common
from kernels.local_attention import block_sizes as block_sizes_lib

_HIGHEST = lax.Precision.HIGHEST
# Finite, so that exp(m_old - m_new) never sees inf - inf on a row with no visible key yet.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_MIN_BLOCK = 16  # tl.dot needs >= 16 rows and columns


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static configuration of one attention call (hashable: it is a custom_vjp nondiff arg)."""
  scale: float
  history_chunk_len: int | None
  sizes: block_sizes_lib.AttentionBlockSizes
  target: str
  interpret: bool
  out_dtype: object


def _block(configured, length):
  """The configured block, shrunk (to a power of two >= 16) when the sequence is shorter."""
  return min(configured, max(_MIN_BLOCK, pl.next_power_of_2(length)))


def _flash_attention_kernel(*refs, scale, block_k, num_key_blocks, kv_len, num_queries,
                            has_key_valid, history_chunk_len, key_offset, precision):
  """One query block against one key set. Refs: q [bq, D], k and v [Tk, D], optionally
  key_valid [1, Tk] (int32) and key_limit [bq, 1] (int32), then o [bq, D] and lse [bq, 1]."""
  q_ref, k_ref, v_ref, *rest = refs
  key_valid_ref = rest.pop(0) if has_key_valid else None
  limit_ref = rest.pop(0) if history_chunk_len else None
  o_ref, lse_ref = rest

  q = q_ref[...]
  block_q, head_dim = q.shape
  limit = None
  upper = num_key_blocks
  if history_chunk_len:
    limit = limit_ref[...]
    # Keys at or past the start of the last query's chunk are never visible to this block.
    last_query = jnp.minimum((pl.program_id(2) + 1) * block_q, num_queries) - 1
    visible = lax.div(last_query, history_chunk_len) * history_chunk_len - key_offset
    upper = jnp.clip(lax.div(visible + block_k - 1, block_k), 0, num_key_blocks)

  def body(j, carry):
    m, l, acc = carry
    start = pl.multiple_of(j * block_k, block_k)
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32) * scale
    key_index = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    mask = None
    if kv_len < num_key_blocks * block_k:
      mask = key_index < kv_len
    if key_valid_ref is not None:
      valid = key_valid_ref[:, pl.ds(start, block_k)] != 0
      mask = valid if mask is None else mask & valid
    if limit is not None:
      before = key_index < limit
      mask = before if mask is None else mask & before
    if mask is not None:
      s = jnp.where(mask, s, _MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - m_new)
    if mask is not None:
      p = jnp.where(mask, p, 0.0)  # a row with nothing visible yet has s == m_new
    alpha = jnp.exp(m - m_new)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)
    return m_new, l, alpha * acc + pv

  init = (jnp.full((block_q, 1), _MASK_VALUE, jnp.float32),
          jnp.zeros((block_q, 1), jnp.float32),
          jnp.zeros((block_q, head_dim), jnp.float32))
  m, l, acc = lax.fori_loop(0, upper, body, init)
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(l_safe))


def _history_limits(num_queries_padded, chunk_len, key_offset):
  """[Tq, 1] int32: query t sees keys (of this segment) with index < the returned value."""
  t = np.arange(num_queries_padded)
  return jnp.asarray(((t // chunk_len) * chunk_len - key_offset)[:, None], jnp.int32)


def _forward_segment(q, k, v, key_valid, config, key_offset):
  """One kernel call. q [B, Tq, H, D]; k, v [B, Tk, H, D]; key_valid [B, Tk] bool or None.

  Returns o [B, Tq, H, D] in config.out_dtype and lse [B, H, Tq] fp32.
  """
  batch, num_queries, heads, head_dim = q.shape
  num_keys = k.shape[1]
  sizes, target = config.sizes, config.target
  block_q = _block(sizes.block_q, num_queries)
  block_k = _block(sizes.block_k, num_keys)
  q_len = common.round_up(num_queries, block_q)
  kv_len = common.round_up(num_keys, block_k)
  q = common.pad_axis(q, 1, q_len)
  k = common.pad_axis(k, 1, kv_len)
  v = common.pad_axis(v, 1, kv_len)
  grid = (batch, heads, q_len // block_q)

  if target == 'gpu':  # [B, T, H, D]: heads are squeezed block dims, nothing is transposed.
    q_spec = pl.BlockSpec((None, block_q, None, head_dim), lambda b, h, i: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, kv_len, None, head_dim), lambda b, h, i: (b, 0, h, 0))
    o_shape = (batch, q_len, heads, head_dim)
  else:  # [B, H, T, D]: Mosaic wants the two minor block dims to be (tokens, head dim).
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    q_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, kv_len, head_dim), lambda b, h, i: (b, h, 0, 0))
    o_shape = (batch, heads, q_len, head_dim)

  inputs = [q, k, v]
  in_specs = [q_spec, kv_spec, kv_spec]
  if key_valid is not None:
    valid = common.pad_axis(key_valid.astype(jnp.int32), 1, kv_len)[:, None, :]  # [B, 1, Tk]
    inputs.append(valid)
    in_specs.append(pl.BlockSpec((None, 1, kv_len), lambda b, h, i: (b, 0, 0)))
  if config.history_chunk_len:
    inputs.append(_history_limits(q_len, config.history_chunk_len, key_offset))
    in_specs.append(pl.BlockSpec((block_q, 1), lambda b, h, i: (i, 0)))

  precision = _HIGHEST if q.dtype == jnp.float32 else None
  kernel = functools.partial(
      _flash_attention_kernel, scale=config.scale, block_k=block_k,
      num_key_blocks=kv_len // block_k, kv_len=num_keys, num_queries=num_queries,
      has_key_valid=key_valid is not None, history_chunk_len=config.history_chunk_len,
      key_offset=key_offset, precision=precision)
  o, lse = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=[q_spec, pl.BlockSpec((None, None, block_q, 1), lambda b, h, i: (b, h, i, 0))],
      out_shape=[jax.ShapeDtypeStruct(o_shape, config.out_dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_len, 1), jnp.float32)],
      compiler_params=common.pallas_compiler_params(target, sizes, len(grid)),
      interpret=config.interpret,
      name='arl2_flash_attention',
  )(*inputs)
  if target == 'tpu':
    o = jnp.swapaxes(o, 1, 2)
  return o[:, :num_queries], lse[:, :, :num_queries, 0]


def merge_attention(o_a, lse_a, o_b, lse_b):
  """Softmax over the union of two key sets from per-set (o, lse); fp32 o [B, T, H, D].

  lse: [B, H, T]; a row that saw nothing in one set has lse = -inf there and zero weight, and
  a row that saw nothing in either gets o = 0, lse = -inf (key segments under the history
  mask). The shift carries no gradient (the result does not depend on it), so -inf rows never
  produce inf - inf in the backward.
  """
  shift = lax.stop_gradient(jnp.maximum(lse_a, lse_b))
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  w_a, w_b = jnp.exp(lse_a - shift), jnp.exp(lse_b - shift)
  total = w_a + w_b
  empty = total == 0.0
  total = jnp.where(empty, 1.0, total)
  weight = lambda w: jnp.swapaxes(w / total, 1, 2)[..., None]  # [B, T, H, 1]
  o = o_a.astype(jnp.float32) * weight(w_a) + o_b.astype(jnp.float32) * weight(w_b)
  return o, jnp.where(empty, -jnp.inf, shift + jnp.log(total))


def _forward(q, k, v, key_valid, config):
  max_kv = config.sizes.max_kv_per_call if config.target == 'tpu' else None
  num_keys = k.shape[1]
  if max_kv is None or num_keys <= max_kv:
    return _forward_segment(q, k, v, key_valid, config, 0)
  seg_config = dataclasses.replace(config, out_dtype=jnp.float32)
  o = lse = None
  for start in range(0, num_keys, max_kv):
    stop = min(start + max_kv, num_keys)
    seg_valid = None if key_valid is None else key_valid[:, start:stop]
    o_s, lse_s = _forward_segment(q, k[:, start:stop], v[:, start:stop], seg_valid, seg_config,
                                  start)
    o, lse = (o_s, lse_s) if o is None else merge_attention(o, lse, o_s, lse_s)
  return o.astype(config.out_dtype), lse


def _visible_key_blocks(config, query_block, block_q, block_k, num_queries, num_key_blocks):
  """How many leading key blocks query block `query_block` sees (static): all of them, or
  under the history mask those before the start of its last query's chunk."""
  if not config.history_chunk_len:
    return num_key_blocks
  c = config.history_chunk_len
  last_query = min((query_block + 1) * block_q, num_queries) - 1
  return min(-(-((last_query // c) * c) // block_k), num_key_blocks)


def _visibility(config, key_ok, key_start, block_k, query_start, block_q):
  """Bool mask broadcastable to [B, H, bq, bk] for one (query block, key block) pair, or None.

  key_ok: [B, bk] (validity and padding of the block's keys) or None.
  """
  mask = None if key_ok is None else key_ok[:, None, None, :]
  if config.history_chunk_len:
    c = config.history_chunk_len
    t = query_start + jnp.arange(block_q)
    before = (key_start + jnp.arange(block_k))[None, :] < ((t // c) * c)[:, None]
    mask = before if mask is None else mask & before
  return mask


def _backward(config, q, k, v, key_valid, o, lse, do, dlse):
  """Exact softmax-attention VJP from the saved lse, flash-style in jnp.

  One `lax.scan` walks the static (query block, key block) pairs that the history mask leaves
  non-empty (`_visible_key_blocks`; every pair without it), `bwd_block_q` x `bwd_block_k` at
  a time: p = exp(s - lse), ds = p (do v^T - do . o + dlse), dq += scale ds k,
  dk += scale ds^T q, dv += p^T do. Neither the logits of a whole query row nor the blocks
  the mask empties are ever formed.
  """
  batch, num_queries, heads, head_dim = q.shape
  num_keys = k.shape[1]
  block_q = min(config.sizes.bwd_block_q, num_queries)
  block_k = min(config.sizes.bwd_block_k, num_keys)
  q_len, k_len = common.round_up(num_queries, block_q), common.round_up(num_keys, block_k)
  pairs = [(i, j) for i in range(q_len // block_q)
           for j in range(_visible_key_blocks(config, i, block_q, block_k, num_queries,
                                              k_len // block_k))]
  if not pairs:  # no query sees a key: nothing flows back
    return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)
  f32 = lambda x: x.astype(jnp.float32)
  einsum = functools.partial(jnp.einsum, precision=_HIGHEST)
  scale = config.scale

  q32, do32 = (common.pad_axis(f32(x), 1, q_len) for x in (q, do))
  k32, v32 = (common.pad_axis(f32(x), 1, k_len) for x in (k, v))
  finite = jnp.isfinite(lse)  # rows that saw no key carry no gradient
  lse = common.pad_axis(jnp.where(finite, lse, 0.0), 2, q_len)
  finite = common.pad_axis(finite, 2, q_len)
  # rowsum(p * dp) = do . o; the lse cotangent adds dlse * p to ds.
  delta = jnp.swapaxes(jnp.sum(f32(do) * f32(o), axis=-1), 1, 2) - dlse
  delta = common.pad_axis(delta, 2, q_len)
  key_ok = None
  if key_valid is not None or k_len > num_keys:
    key_ok = jnp.ones((batch, num_keys), bool) if key_valid is None else key_valid
    key_ok = common.pad_axis(key_ok, 1, k_len, value=False)

  def add(acc, x, start):
    return lax.dynamic_update_slice_in_dim(
        acc, lax.dynamic_slice_in_dim(acc, start, x.shape[1], axis=1) + x, start, axis=1)

  def step(carry, xs):
    dq, dk, dv = carry
    i, j = xs
    q_start, k_start = i * block_q, j * block_k
    rows = lambda x, axis: lax.dynamic_slice_in_dim(x, q_start, block_q, axis=axis)
    keys = lambda x: lax.dynamic_slice_in_dim(x, k_start, block_k, axis=1)
    q_b, do_b = rows(q32, 1), rows(do32, 1)
    k_b, v_b = keys(k32), keys(v32)
    s = scale * einsum('bqhd,bkhd->bhqk', q_b, k_b)
    mask = _visibility(config, None if key_ok is None else keys(key_ok), k_start, block_k,
                       q_start, block_q)
    if mask is not None:
      s = jnp.where(mask, s, -jnp.inf)
    p = jnp.where(rows(finite, 2)[..., None], jnp.exp(s - rows(lse, 2)[..., None]), 0.0)
    ds = p * (einsum('bqhd,bkhd->bhqk', do_b, v_b) - rows(delta, 2)[..., None])
    dq = add(dq, scale * einsum('bhqk,bkhd->bqhd', ds, k_b), q_start)
    dk = add(dk, scale * einsum('bhqk,bqhd->bkhd', ds, q_b), k_start)
    dv = add(dv, einsum('bhqk,bqhd->bkhd', p, do_b), k_start)
    return (dq, dk, dv), None

  init = (jnp.zeros(q32.shape, jnp.float32), jnp.zeros(k32.shape, jnp.float32),
          jnp.zeros(v32.shape, jnp.float32))
  query_blocks, key_blocks = (jnp.asarray(x, jnp.int32) for x in zip(*pairs))
  (dq, dk, dv), _ = lax.scan(step, init, (query_blocks, key_blocks))
  return (dq[:, :num_queries].astype(q.dtype), dk[:, :num_keys].astype(k.dtype),
          dv[:, :num_keys].astype(v.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, key_valid, config):
  return _forward(q, k, v, key_valid, config)


def _attention_fwd(q, k, v, key_valid, config):
  o, lse = _forward(q, k, v, key_valid, config)
  return (o, lse), (q, k, v, key_valid, o, lse)


def _attention_bwd(config, residuals, cotangents):
  q, k, v, key_valid, o, lse = residuals
  do, dlse = cotangents
  dq, dk, dv = _backward(config, q, k, v, key_valid, o, lse, do, dlse)
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q, k, v, *, key_valid=None, history_chunk_len=None, scale=None,
                    block_sizes=None, interpret=False, target=None, out_dtype=None):
  """Softmax attention of q over one key set, returning the output and its log-sum-exp.

  Args:
    q: [B, Tq, H, D].
    k, v: [B, Tk, H, D].
    key_valid: bool [Tk] or [B, Tk], or None; invalid keys are ignored.
    history_chunk_len: None, or c: query t then sees key s only if s < c * (t // c) (queries
      and keys share positions, so with c = L a query sees the chunks before its own).
    scale: logit scale; defaults to D**-0.5.
    block_sizes: `AttentionBlockSizes`, or None for the tuned/default ones.
    interpret: run the kernel in Pallas interpret mode (any backend, slow).
    target: 'gpu' or 'tpu' lowering and block layout; None picks the local platform
      ('gpu' layout in interpret mode on CPU).
    out_dtype: dtype of o; defaults to q.dtype.

  Returns:
    o [B, Tq, H, D] (rows that see no key are 0) and lse [B, H, Tq] fp32 (-inf there).
  """
  target = common.resolve_target(target, interpret, op='attention')
  batch, num_keys = k.shape[:2]
  if scale is None:
    scale = q.shape[-1]**-0.5
  if block_sizes is None:
    block_sizes = block_sizes_lib.get_block_sizes(q.dtype, num_keys, interpret=interpret)
  if key_valid is not None:
    key_valid = jnp.broadcast_to(jnp.asarray(key_valid, bool), (batch, num_keys))
  if history_chunk_len is not None and (not isinstance(history_chunk_len, int)
                                        or history_chunk_len <= 0):
    raise ValueError(f'{history_chunk_len=} must be None or a positive integer')
  config = _Config(scale=float(scale), history_chunk_len=history_chunk_len,
                   sizes=block_sizes, target=target, interpret=bool(interpret),
                   out_dtype=jnp.dtype(out_dtype or q.dtype))
  return _attention(q, k, v, key_valid, config)


def chunk_local_attention(q, k, v, *, scale=None, block_sizes=None, interpret=False,
                          target=None):
  """Bidirectional attention within each chunk. q, k, v: [B, N, L, H, D] -> same, q.dtype."""
  batch, num_chunks, chunk_len = q.shape[:3]
  fold = lambda x: x.reshape(batch * num_chunks, chunk_len, *x.shape[3:])
  o, _ = flash_attention(fold(q), fold(k), fold(v), scale=scale, block_sizes=block_sizes,
                         interpret=interpret, target=target)
  return o.reshape(q.shape)


def cached_chunk_attention(q, k, v, k_cache, v_cache, cache_valid, *, scale=None,
                           block_sizes=None, interpret=False, target=None):
  """One chunk attends to the valid cache slots plus its own L keys, under one softmax.

  Args:
    q, k, v: [B, L, H, D].
    k_cache, v_cache: [B, M, H, D].
    cache_valid: bool [M] or [B, M].

  Returns:
    [B, L, H, D] in q.dtype.
  """
  kw = dict(scale=scale, block_sizes=block_sizes, interpret=interpret, target=target,
            out_dtype=jnp.float32)
  o_cache, lse_cache = flash_attention(q, k_cache, v_cache, key_valid=cache_valid, **kw)
  o_own, lse_own = flash_attention(q, k, v, **kw)
  o, _ = merge_attention(o_cache, lse_cache, o_own, lse_own)
  return o.astype(q.dtype)


def teacher_forcing_attention(q_clean, k_clean, v_clean, q_noisy, k_noisy, v_noisy, *,
                              num_chunks, scale=None, block_sizes=None, interpret=False,
                              target=None):
  """Teacher-forcing attention: clean chunk n sees clean <= n; noisy n sees clean < n and
  noisy n. All inputs [B, N * L, H, D]; returns (o_clean, o_noisy) in q.dtype.

  Both query sets attend to the clean history (strictly earlier chunks, skipped block-wise in
  the kernel) and to their own chunk; the two are merged by log-sum-exp.
  """
  batch, seq_len = q_clean.shape[:2]
  if num_chunks <= 0 or seq_len % num_chunks:
    raise ValueError(f'{seq_len=} must be a positive multiple of {num_chunks=}')
  chunk_len = seq_len // num_chunks
  kw = dict(scale=scale, block_sizes=block_sizes, interpret=interpret, target=target,
            out_dtype=jnp.float32)
  fold = lambda x: x.reshape(batch * num_chunks, chunk_len, *x.shape[2:])

  def attend(q, k_own, v_own):
    o_hist, lse_hist = flash_attention(q, k_clean, v_clean, history_chunk_len=chunk_len, **kw)
    o_own, lse_own = flash_attention(fold(q), fold(k_own), fold(v_own), **kw)
    unfold = lambda x: x.reshape(batch, seq_len, *x.shape[2:])
    lse_own = jnp.moveaxis(lse_own.reshape(batch, num_chunks, -1, chunk_len), 1, 2)
    o, _ = merge_attention(o_hist, lse_hist, unfold(o_own),
                           lse_own.reshape(batch, -1, seq_len))
    return o.astype(q.dtype)

  return attend(q_clean, k_clean, v_clean), attend(q_noisy, k_noisy, v_noisy)


def attention_flops(batch, heads, num_queries, num_keys, head_dim, visible_fraction=1.0):
  """Forward FLOPs of softmax attention (two matmuls), for TFLOP/s reporting."""
  return 4.0 * batch * heads * num_queries * num_keys * head_dim * visible_fraction

