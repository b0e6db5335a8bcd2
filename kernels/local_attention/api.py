"""Public entry points for the ARL2 softmax attention patterns. Models import only this.

Shapes: B batch, H heads, D head dim, N chunks, L tokens per chunk, M cache slots.

`implementation` picks the back-end: "xla" (`xla.py`), "reference" (dense explicit masks,
`reference.py`) or "pallas". None picks the best available, which is "xla" until the Pallas
kernel lands. An explicit choice that cannot run raises.
"""

from kernels.local_attention import reference
from kernels.local_attention import xla

IMPLEMENTATIONS = ('xla', 'reference', 'pallas')


def _resolve(implementation):
  if implementation is None:
    return 'xla'
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f'{implementation=} is not supported; expected one of {IMPLEMENTATIONS} or None')
  if implementation == 'pallas':
    raise ValueError(
        "implementation='pallas': the Pallas attention kernel is not available in this "
        "build; use 'xla' or 'reference'")
  return implementation


def _expect_shape(name, x, expected, description):
  if tuple(x.shape) != tuple(expected):
    raise ValueError(f'{name} has shape {x.shape}, expected {description} = {tuple(expected)}')


def _check_rank(name, x, rank, description):
  if x.ndim != rank:
    raise ValueError(f'{name} has shape {x.shape}, expected {description}')


def chunk_local_attention(q, k, v, *, scale=None, implementation=None, interpret=False):
  """Bidirectional softmax attention within each chunk only.

  Args:
    q, k, v: [B, N, L, H, D].
    scale: logit scale; defaults to D**-0.5.
    implementation: None, "xla", "reference" or "pallas".
    interpret: run the Pallas kernel in interpret mode (only used by "pallas").

  Returns:
    [B, N, L, H, D] in q.dtype.
  """
  del interpret  # Only the Pallas path uses it.
  implementation = _resolve(implementation)
  _check_rank('q', q, 5, '[B, N, L, H, D]')
  _expect_shape('k', k, q.shape, '[B, N, L, H, D]')
  _expect_shape('v', v, q.shape, '[B, N, L, H, D]')
  if implementation == 'reference':
    return reference.chunk_local_attention_reference(q, k, v, scale=scale)
  return xla.chunk_local_attention(q, k, v, scale=scale)


def cached_chunk_attention(q, k, v, k_cache, v_cache, cache_valid, *, scale=None,
                           implementation=None, interpret=False):
  """One chunk attends to the valid cache slots plus all L keys of its own, one softmax.

  Args:
    q, k, v: [B, L, H, D].
    k_cache, v_cache: [B, M, H, D].
    cache_valid: bool [M] or [B, M]; invalid slots are ignored.
    scale: logit scale; defaults to D**-0.5.
    implementation: None, "xla", "reference" or "pallas".
    interpret: run the Pallas kernel in interpret mode (only used by "pallas").

  Returns:
    [B, L, H, D] in q.dtype.
  """
  del interpret  # Only the Pallas path uses it.
  implementation = _resolve(implementation)
  _check_rank('q', q, 4, '[B, L, H, D]')
  batch, _, heads, head_dim = q.shape
  _expect_shape('k', k, q.shape, '[B, L, H, D]')
  _expect_shape('v', v, q.shape, '[B, L, H, D]')
  _check_rank('k_cache', k_cache, 4, '[B, M, H, D]')
  cache_len = k_cache.shape[1]
  _expect_shape('k_cache', k_cache, (batch, cache_len, heads, head_dim), '[B, M, H, D]')
  _expect_shape('v_cache', v_cache, k_cache.shape, '[B, M, H, D]')
  if tuple(cache_valid.shape) not in ((cache_len,), (batch, cache_len)):
    raise ValueError(f'cache_valid has shape {cache_valid.shape}, expected [M] = '
                     f'{(cache_len,)} or [B, M] = {(batch, cache_len)}')
  if cache_valid.dtype != bool:
    raise ValueError(f'cache_valid has dtype {cache_valid.dtype}, expected bool')
  if implementation == 'reference':
    return reference.cached_chunk_attention_reference(
        q, k, v, k_cache, v_cache, cache_valid, scale=scale)
  return xla.cached_chunk_attention(q, k, v, k_cache, v_cache, cache_valid, scale=scale)


def teacher_forcing_attention(q_clean, k_clean, v_clean, q_noisy, k_noisy, v_noisy, *,
                              num_chunks, scale=None, implementation=None, interpret=False):
  """Teacher-forcing softmax attention over a clean and a noisy copy of N chunks.

  Clean chunk n attends to clean chunks <= n. Noisy chunk n attends to clean chunks < n and to
  noisy chunk n itself, under one softmax; noisy chunk 0 sees only itself.

  Args:
    q_clean, k_clean, v_clean, q_noisy, k_noisy, v_noisy: [B, N * L, H, D].
    num_chunks: N; the sequence length must be a multiple of it.
    scale: logit scale; defaults to D**-0.5.
    implementation: None, "xla", "reference" or "pallas".
    interpret: run the Pallas kernel in interpret mode (only used by "pallas").

  Returns:
    (o_clean, o_noisy), each [B, N * L, H, D] in q.dtype.
  """
  del interpret  # Only the Pallas path uses it.
  implementation = _resolve(implementation)
  _check_rank('q_clean', q_clean, 4, '[B, N * L, H, D]')
  inputs = dict(k_clean=k_clean, v_clean=v_clean, q_noisy=q_noisy, k_noisy=k_noisy,
                v_noisy=v_noisy)
  for name, x in inputs.items():
    _expect_shape(name, x, q_clean.shape, '[B, N * L, H, D]')
  seq_len = q_clean.shape[1]
  if not isinstance(num_chunks, int) or num_chunks <= 0 or seq_len % num_chunks:
    raise ValueError(f'{seq_len=} must be a multiple of {num_chunks=} (a positive integer)')
  fn = (reference.teacher_forcing_attention_reference if implementation == 'reference'
        else xla.teacher_forcing_attention)
  return fn(q_clean, k_clean, v_clean, q_noisy, k_noisy, v_noisy, num_chunks=num_chunks,
            scale=scale)
