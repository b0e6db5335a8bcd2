"""Step-by-step fp32 oracles for the gated delta rule and the ARL2 memory.

K-first state h in R^{K x V}, fp32. For each token t:

    h <- exp(g_t) h ;  u_t = beta_t (v_t - h^T k_t) ;  h <- h + k_t u_t^T ;  o_t = h^T (scale q_t)

Shapes: B batch, T tokens, H heads, K key dim, V value dim; for the ARL2 memory, N autoregressive
chunks, L tokens written per chunk, R reading tokens per chunk.

These are the obviously-correct versions: one `lax.scan` over tokens, everything in fp32 with
HIGHEST matmul precision. Use them in tests, never in production.
"""

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def naive_recurrent_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None):
  """Gated delta rule, one token at a time.

  Args:
    q, k: [B, T, H, K].
    v: [B, T, H, V].
    g: [B, T, H], log of the per-token decay (usually <= 0).
    beta: [B, T, H], write strength (usually in (0, 2)).
    scale: multiplies q; defaults to K**-0.5.
    initial_state: [B, H, K, V] or None (zeros).

  Returns:
    o: [B, T, H, V] in v.dtype, and final_state: [B, H, K, V] in fp32.
  """
  batch, _, heads, key_dim = q.shape
  value_dim = v.shape[-1]
  if scale is None:
    scale = key_dim**-0.5
  if initial_state is None:
    h0 = jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)
  else:
    h0 = initial_state.astype(jnp.float32)

  def step(h, xs):
    q_t, k_t, v_t, g_t, beta_t = xs
    h = h * jnp.exp(g_t)[..., None, None]
    predicted = jnp.einsum('bhkv,bhk->bhv', h, k_t, precision=_HIGHEST)
    u = beta_t[..., None] * (v_t - predicted)
    h = h + jnp.einsum('bhk,bhv->bhkv', k_t, u, precision=_HIGHEST)
    o_t = jnp.einsum('bhkv,bhk->bhv', h, scale * q_t, precision=_HIGHEST)
    return h, o_t

  time_major = lambda x: jnp.moveaxis(x.astype(jnp.float32), 1, 0)
  xs = tuple(time_major(x) for x in (q, k, v, g, beta))
  final_state, o = jax.lax.scan(step, h0, xs)
  return jnp.moveaxis(o, 0, 1).astype(v.dtype), final_state


def arl2_memory_reference(q, k, v, g, beta, *, initial_state=None, scale=None):
  """ARL2 block-level read and write over N chunks, built on the naive recurrence.

  Every reading token of chunk n sees the same state S_{n-1} (no decay on read); the L tokens
  of chunk n are then written token by token.

  Args:
    q: [B, N, R, H, K] reading queries.
    k: [B, N, L, H, K].
    v: [B, N, L, H, V].
    g, beta: [B, N, L, H].
    initial_state: [B, H, K, V] or None (zeros).
    scale: multiplies q; defaults to K**-0.5.

  Returns:
    reads: [B, N, R, H, V] in v.dtype;
    prev_states: [B, N, H, K, V] fp32, the state before each chunk;
    final_state: [B, H, K, V] fp32.
  """
  batch, _, _, heads, key_dim = q.shape
  value_dim = v.shape[-1]
  if scale is None:
    scale = key_dim**-0.5
  if initial_state is None:
    h0 = jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)
  else:
    h0 = initial_state.astype(jnp.float32)

  def chunk_step(h, xs):
    q_n, k_n, v_n, g_n, beta_n = xs
    read = jnp.einsum('brhk,bhkv->brhv', scale * q_n, h, precision=_HIGHEST)
    _, h_next = naive_recurrent_gated_delta_rule(
        q=k_n, k=k_n, v=v_n, g=g_n, beta=beta_n, scale=scale, initial_state=h)
    return h_next, (read, h)

  chunk_major = lambda x: jnp.moveaxis(x.astype(jnp.float32), 1, 0)
  xs = tuple(chunk_major(x) for x in (q, k, v, g, beta))
  final_state, (reads, prev_states) = jax.lax.scan(chunk_step, h0, xs)
  reads = jnp.moveaxis(reads, 0, 1).astype(v.dtype)
  return reads, jnp.moveaxis(prev_states, 0, 1), final_state
