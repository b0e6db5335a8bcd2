"""Public entry points for the gated delta rule and the ARL2 memory. Models import only this.

K-first state h in R^{K x V}, fp32. For each token t:

    h <- exp(g_t) h ;  u_t = beta_t (v_t - h^T k_t) ;  h <- h + k_t u_t^T ;  o_t = h^T (scale q_t)

Shapes: B batch, T tokens, H heads, K key dim, V value dim; for the ARL2 memory, N
autoregressive chunks, L tokens written per chunk, R reading tokens per chunk.

`implementation` picks the back-end:
- "pallas": the chunked WY kernels (`pallas_gated_delta.py`), compiled for GPU (Pallas Triton)
  or TPU (Mosaic). On any other backend it needs `interpret=True` (Pallas interpret mode:
  slow, for tests) and raises a ValueError otherwise. The GPU kernel needs chunk_size to be a
  power of two >= 16 and raises otherwise. The TPU kernel holds a whole (batch, head)
  sequence in VMEM and raises above `GatedDeltaBlockSizes.max_tokens` held tokens (written
  tokens plus reading queries, `pallas_gated_delta.held_tokens`).
- "xla": chunkwise jnp (`xla.py`), runs everywhere.
- "reference": the token-by-token scan (`reference.py`), the oracle.
- None: "pallas" on GPU and TPU when chunk_size suits the kernel and, on TPU, the sequence
  is within max_tokens (long teacher-forcing sequences run the XLA chunked path), else "xla";
  with `interpret=True`, "pallas" in interpret mode everywhere (a request to test the kernel
  is never silently answered by XLA).

`interpret` only affects "pallas" (and None); "xla" and "reference" ignore it. `block_sizes`
(a `GatedDeltaBlockSizes`; None uses `block_sizes.get_block_sizes`) only affects "pallas" and,
through `max_tokens`, None's choice on TPU.
"""

from __future__ import annotations

from kernels import common
from kernels.gated_delta import block_sizes as block_sizes_lib
from kernels.gated_delta import pallas_gated_delta
from kernels.gated_delta import reference
from kernels.gated_delta import xla


def _pallas_supports(platform, chunk_size, num_tokens, sizes):
  if not isinstance(chunk_size, int) or chunk_size <= 0:
    return False
  if platform == 'gpu':
    return chunk_size >= 16 and common.is_power_of_two(chunk_size)
  # TPU: the state kernel holds a whole (batch, head) sequence in VMEM.
  fits = sizes is None or pallas_gated_delta.fits_tpu(num_tokens, sizes)
  return chunk_size % 8 == 0 and fits


def resolve_implementation(implementation, interpret=False, chunk_size=64, num_tokens=0,
                           sizes=None):
  """The implementation that will run; raises if an explicit choice cannot run here.

  None picks "pallas" on GPU/TPU only when `chunk_size` suits that platform's kernel and, on
  TPU, when `num_tokens` held tokens per (batch, head) are within `sizes.max_tokens` (the
  block sizes the kernel would run with; None: no limit). Longer sequences take "xla".
  """
  return common.resolve_implementation(
      implementation, interpret, op='gated-delta',
      pallas_supports=lambda platform: _pallas_supports(platform, chunk_size, num_tokens,
                                                        sizes))


def _resolve(implementation, interpret, chunk_size, k, block_sizes, written, held):
  """`resolve_implementation` with the block sizes the kernel would look up (by `written`
  tokens, as `pallas_gated_delta` does) and `held` tokens per (batch, head)."""
  sizes = block_sizes or block_sizes_lib.get_block_sizes(k.dtype, written, interpret=interpret)
  return resolve_implementation(implementation, interpret, chunk_size, held, sizes)


def _check_state(initial_state, batch, heads, key_dim, value_dim):
  if initial_state is not None:
    common.expect_shape('initial_state', initial_state, (batch, heads, key_dim, value_dim),
                        '[B, H, K, V]')


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, chunk_size=64,
                     implementation=None, interpret=False, block_sizes=None):
  """Gated delta rule over a sequence, with per-token outputs.

  Args:
    q, k: [B, T, H, K].
    v: [B, T, H, V].
    g: [B, T, H], log decay per token (<= 0 in ARL2).
    beta: [B, T, H], write strength (in (0, 2) in ARL2).
    scale: multiplies q; defaults to K**-0.5.
    initial_state: [B, H, K, V] or None (zeros).
    chunk_size: C, the sub-chunk length of the chunked paths.
    implementation: None, "xla", "reference" or "pallas".
    interpret: run the Pallas kernels in interpret mode (used by "pallas" and None).
    block_sizes: `GatedDeltaBlockSizes` for "pallas"; None for the tuned/default ones.

  Returns:
    o: [B, T, H, V] in v.dtype, and final_state: [B, H, K, V] in fp32.
  """
  common.check_rank('q', q, 4, '[B, T, H, K]')
  batch, seq_len, heads, key_dim = q.shape
  common.expect_shape('k', k, q.shape, '[B, T, H, K]')
  common.check_rank('v', v, 4, '[B, T, H, V]')
  value_dim = v.shape[-1]
  common.expect_shape('v', v, (batch, seq_len, heads, value_dim), '[B, T, H, V]')
  common.expect_shape('g', g, (batch, seq_len, heads), '[B, T, H]')
  common.expect_shape('beta', beta, (batch, seq_len, heads), '[B, T, H]')
  _check_state(initial_state, batch, heads, key_dim, value_dim)
  implementation = _resolve(implementation, interpret, chunk_size, k, block_sizes, seq_len,
                            pallas_gated_delta.held_tokens(1, seq_len, seq_len))

  if implementation == 'reference':
    return reference.naive_recurrent_gated_delta_rule(
        q, k, v, g, beta, scale=scale, initial_state=initial_state)
  if implementation == 'pallas':
    return pallas_gated_delta.gated_delta_rule(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, chunk_size=chunk_size,
        block_sizes=block_sizes, interpret=interpret)
  return xla.chunk_gated_delta_rule(
      q, k, v, g, beta, scale=scale, initial_state=initial_state, chunk_size=chunk_size)


def arl2_memory(q, k, v, g, beta, *, initial_state=None, scale=None, chunk_size=64,
                implementation=None, interpret=False, block_sizes=None):
  """ARL2 memory: every reading token of chunk n reads S_{n-1}, then chunk n is written.

  reads[:, n] = scale * q[:, n] . S_{n-1} (no decay on read), S_{-1} = initial_state; S_n is
  the gated delta rule over the L tokens of chunk n, whose per-token outputs are discarded.

  Args:
    q: [B, N, R, H, K] reading queries.
    k: [B, N, L, H, K].
    v: [B, N, L, H, V].
    g, beta: [B, N, L, H].
    initial_state: [B, H, K, V] or None (zeros).
    scale: multiplies q; defaults to K**-0.5.
    chunk_size: C, the sub-chunk length of the chunked paths.
    implementation: None, "xla", "reference" or "pallas".
    interpret: run the Pallas kernels in interpret mode (used by "pallas" and None).
    block_sizes: `GatedDeltaBlockSizes` for "pallas"; None for the tuned/default ones.

  Returns:
    reads: [B, N, R, H, V] in v.dtype;
    prev_states: [B, N, H, K, V] fp32, the state each chunk reads;
    final_state: [B, H, K, V] fp32.
  """
  common.check_rank('q', q, 5, '[B, N, R, H, K]')
  batch, num_chunks, num_reads, heads, key_dim = q.shape
  common.check_rank('k', k, 5, '[B, N, L, H, K]')
  chunk_len = k.shape[2]
  common.expect_shape('k', k, (batch, num_chunks, chunk_len, heads, key_dim), '[B, N, L, H, K]')
  common.check_rank('v', v, 5, '[B, N, L, H, V]')
  value_dim = v.shape[-1]
  common.expect_shape('v', v, (batch, num_chunks, chunk_len, heads, value_dim), '[B, N, L, H, V]')
  common.expect_shape('g', g, (batch, num_chunks, chunk_len, heads), '[B, N, L, H]')
  common.expect_shape('beta', beta, (batch, num_chunks, chunk_len, heads), '[B, N, L, H]')
  _check_state(initial_state, batch, heads, key_dim, value_dim)
  implementation = _resolve(implementation, interpret, chunk_size, k, block_sizes,
                            num_chunks * chunk_len,
                            pallas_gated_delta.held_tokens(num_chunks, chunk_len, num_reads))

  if implementation == 'reference':
    return reference.arl2_memory_reference(
        q, k, v, g, beta, initial_state=initial_state, scale=scale)
  if implementation == 'pallas':
    return pallas_gated_delta.arl2_memory(
        q, k, v, g, beta, initial_state=initial_state, scale=scale, chunk_size=chunk_size,
        block_sizes=block_sizes, interpret=interpret)
  return xla.chunk_arl2_memory(
      q, k, v, g, beta, initial_state=initial_state, scale=scale, chunk_size=chunk_size)
