"""Public entry points for the ARL2 softmax attention patterns. Models import only this.

Shapes: B batch, H heads, D head dim, N chunks, L tokens per chunk, M cache slots.

`implementation` picks the back-end:
- "pallas": the flash-attention kernel (`pallas_attention.py`), compiled for GPU (Pallas
  Triton) or TPU (Mosaic). On any other backend it needs `interpret=True` (Pallas interpret
  mode: slow, for tests) and raises a ValueError otherwise.
- "xla": plain jnp (`xla.py`), runs everywhere.
- "reference": dense explicit masks (`reference.py`), the oracle.
- None: "pallas" on GPU and TPU, "xla" elsewhere; with `interpret=True`, "pallas" in
  interpret mode everywhere (a request to test the kernel is never silently answered by XLA).

`interpret` only affects "pallas" (and None); "xla" and "reference" ignore it. `block_sizes`
(an `AttentionBlockSizes`; None uses `block_sizes.get_block_sizes`) sets the kernel's tiling
for "pallas" and, through `xla_key_block`, the key block of the XLA path's blocked sweeps
(cached and teacher-forcing attention); "reference" ignores it.
"""

from __future__ import annotations

from kernels import common
from kernels.local_attention import block_sizes as block_sizes_lib
from kernels.local_attention import pallas_attention
from kernels.local_attention import reference
from kernels.local_attention import xla


def resolve_implementation(implementation, interpret):
  """The implementation that will run; raises if an explicit choice cannot run here."""
  return common.resolve_implementation(implementation, interpret, op='attention')


def _xla_key_block(block_sizes, dtype, num_keys):
  """The XLA sweeps' key block from the given or looked-up block sizes (None: xla's default)."""
  sizes = block_sizes or block_sizes_lib.get_block_sizes(dtype, num_keys)
  return sizes.xla_key_block


def chunk_local_attention(q, k, v, *, scale=None, implementation=None, interpret=False,
                          block_sizes=None):
  """Bidirectional softmax attention within each chunk only.

  Args:
    q, k, v: [B, N, L, H, D].
    scale: logit scale; defaults to D**-0.5.
    implementation: None, "xla", "reference" or "pallas".
    interpret: run the Pallas kernel in interpret mode (used by "pallas" and None).
    block_sizes: `AttentionBlockSizes` for "pallas"; None for the tuned/default ones.

  Returns:
    [B, N, L, H, D] in q.dtype.
  """
  implementation = resolve_implementation(implementation, interpret)
  common.check_rank('q', q, 5, '[B, N, L, H, D]')
  common.expect_shape('k', k, q.shape, '[B, N, L, H, D]')
  common.expect_shape('v', v, q.shape, '[B, N, L, H, D]')
  if implementation == 'reference':
    return reference.chunk_local_attention_reference(q, k, v, scale=scale)
  if implementation == 'pallas':
    return pallas_attention.chunk_local_attention(
        q, k, v, scale=scale, block_sizes=block_sizes, interpret=interpret)
  return xla.chunk_local_attention(q, k, v, scale=scale)


def cached_chunk_attention(q, k, v, k_cache, v_cache, cache_valid, *, scale=None,
                           implementation=None, interpret=False, block_sizes=None):
  """One chunk attends to the valid cache slots plus all L keys of its own, one softmax.

  Args:
    q, k, v: [B, L, H, D].
    k_cache, v_cache: [B, M, H, D].
    cache_valid: bool [M] or [B, M]; invalid slots are ignored.
    scale: logit scale; defaults to D**-0.5.
    implementation: None, "xla", "reference" or "pallas".
    interpret: run the Pallas kernel in interpret mode (used by "pallas" and None).
    block_sizes: `AttentionBlockSizes` for "pallas" (and `xla_key_block` for "xla"); None
      for the tuned/default ones.

  Returns:
    [B, L, H, D] in q.dtype.
  """
  implementation = resolve_implementation(implementation, interpret)
  common.check_rank('q', q, 4, '[B, L, H, D]')
  batch, _, heads, head_dim = q.shape
  common.expect_shape('k', k, q.shape, '[B, L, H, D]')
  common.expect_shape('v', v, q.shape, '[B, L, H, D]')
  common.check_rank('k_cache', k_cache, 4, '[B, M, H, D]')
  cache_len = k_cache.shape[1]
  common.expect_shape('k_cache', k_cache, (batch, cache_len, heads, head_dim), '[B, M, H, D]')
  common.expect_shape('v_cache', v_cache, k_cache.shape, '[B, M, H, D]')
  if tuple(cache_valid.shape) not in ((cache_len,), (batch, cache_len)):
    raise ValueError(f'cache_valid has shape {cache_valid.shape}, expected [M] = '
                     f'{(cache_len,)} or [B, M] = {(batch, cache_len)}')
  if cache_valid.dtype != bool:
    raise ValueError(f'cache_valid has dtype {cache_valid.dtype}, expected bool')
  if implementation == 'reference':
    return reference.cached_chunk_attention_reference(
        q, k, v, k_cache, v_cache, cache_valid, scale=scale)
  if implementation == 'pallas':
    return pallas_attention.cached_chunk_attention(
        q, k, v, k_cache, v_cache, cache_valid, scale=scale, block_sizes=block_sizes,
        interpret=interpret)
  return xla.cached_chunk_attention(
      q, k, v, k_cache, v_cache, cache_valid, scale=scale,
      key_block=_xla_key_block(block_sizes, q.dtype, cache_len))


def teacher_forcing_attention(q_clean, k_clean, v_clean, q_noisy, k_noisy, v_noisy, *,
                              num_chunks, scale=None, implementation=None, interpret=False,
                              block_sizes=None):
  """Teacher-forcing softmax attention over a clean and a noisy copy of N chunks.

  Clean chunk n attends to clean chunks <= n. Noisy chunk n attends to clean chunks < n and to
  noisy chunk n itself, under one softmax; noisy chunk 0 sees only itself.

  Args:
    q_clean, k_clean, v_clean, q_noisy, k_noisy, v_noisy: [B, N * L, H, D].
    num_chunks: N; the sequence length must be a multiple of it.
    scale: logit scale; defaults to D**-0.5.
    implementation: None, "xla", "reference" or "pallas".
    interpret: run the Pallas kernel in interpret mode (used by "pallas" and None).
    block_sizes: `AttentionBlockSizes` for "pallas" (and `xla_key_block` for "xla", whose
      sweep skips the key blocks the block-causal mask empties); None for the tuned/default
      ones.

  Returns:
    (o_clean, o_noisy), each [B, N * L, H, D] in q.dtype.
  """
  implementation = resolve_implementation(implementation, interpret)
  common.check_rank('q_clean', q_clean, 4, '[B, N * L, H, D]')
  inputs = dict(k_clean=k_clean, v_clean=v_clean, q_noisy=q_noisy, k_noisy=k_noisy,
                v_noisy=v_noisy)
  for name, x in inputs.items():
    common.expect_shape(name, x, q_clean.shape, '[B, N * L, H, D]')
  seq_len = q_clean.shape[1]
  if not isinstance(num_chunks, int) or num_chunks <= 0 or seq_len % num_chunks:
    raise ValueError(f'{seq_len=} must be a multiple of {num_chunks=} (a positive integer)')
  if implementation == 'pallas':
    return pallas_attention.teacher_forcing_attention(
        q_clean, k_clean, v_clean, q_noisy, k_noisy, v_noisy, num_chunks=num_chunks,
        scale=scale, block_sizes=block_sizes, interpret=interpret)
  args = (q_clean, k_clean, v_clean, q_noisy, k_noisy, v_noisy)
  if implementation == 'reference':
    return reference.teacher_forcing_attention_reference(*args, num_chunks=num_chunks,
                                                         scale=scale)
  return xla.teacher_forcing_attention(
      *args, num_chunks=num_chunks, scale=scale,
      key_block=_xla_key_block(block_sizes, q_clean.dtype, seq_len))
