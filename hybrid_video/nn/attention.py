"""Softmax self-attention (block-causal, with a K/V cache) and cross-attention.

Token layout: x [B, T, dim] with T = chunks * L; heads split as [B, T, H, D].
Teacher forcing: clean chunk n sees clean chunks <= n; noisy chunk n sees clean chunks < n and
itself. Streaming: a chunk sees the valid cached chunks plus itself; the context pass (write)
stores the clean chunk's rotated K and V in its cache slot.
"""

from __future__ import annotations

import jax
from flax import nnx

from hybrid_video import kernel_calls
from hybrid_video.errors import UserError
from hybrid_video.nn.embeddings import apply_rope


class QKVProjection(nnx.Module):
  """W_q, W_k, W_v, W_o with bias, and RMSNorm on q and k over the full width (Wan)."""

  def __init__(self, dim: int, num_heads: int, eps: float, *, rngs: nnx.Rngs, dtype=None):
    if dim % num_heads:
      raise UserError(f"{dim=} must be a multiple of {num_heads=}")
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    linear = lambda: nnx.Linear(dim, dim, rngs=rngs, dtype=dtype)
    self.q, self.k, self.v, self.o = linear(), linear(), linear(), linear()
    self.norm_q = nnx.RMSNorm(dim, epsilon=eps, rngs=rngs, dtype=dtype)
    self.norm_k = nnx.RMSNorm(dim, epsilon=eps, rngs=rngs, dtype=dtype)

  def heads(self, x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

  def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, T, dim] -> normalised q, k and v, each [B, T, H, D], before RoPE."""
    q = self.heads(self.norm_q(self.q(x)))
    k = self.heads(self.norm_k(self.k(x)))
    return q, k, self.heads(self.v(x))

  def out(self, y: jax.Array) -> jax.Array:
    """y [B, T, H, D] -> [B, T, dim]."""
    return self.o(y.reshape(*y.shape[:-2], -1))


class SelfAttention(QKVProjection):
  """The softmax layer of the causal DiT."""

  def __init__(self, dim, num_heads, eps, *, rngs, dtype=None, implementation=None,
               interpret: bool = False):
    super().__init__(dim, num_heads, eps, rngs=rngs, dtype=dtype)
    self.implementation = implementation
    self.interpret = bool(interpret)  # Pallas interpret mode (CPU tests of the kernels)

  def teacher_forcing(self, x_clean, x_noisy, angles, num_chunks: int):
    """x_* [B, N*L, dim], angles [N*L, D/2] -> (y_clean, y_noisy), each [B, N*L, dim]."""
    yc, yn = self.teacher_forcing_heads(x_clean, x_noisy, angles, num_chunks)
    return self.out(yc), self.out(yn)

  def teacher_forcing_heads(self, x_clean, x_noisy, angles, num_chunks: int):
    """`teacher_forcing` before W_o: (y_clean, y_noisy) [B, N*L, H, D] (conversion targets)."""
    qc, kc, vc = self.project(x_clean)
    qn, kn, vn = self.project(x_noisy)
    qc, kc, qn, kn = (apply_rope(a, angles) for a in (qc, kc, qn, kn))
    return kernel_calls.teacher_forcing_attention(
        qc, kc, vc, qn, kn, vn, num_chunks=num_chunks, implementation=self.implementation,
        interpret=self.interpret)

  def step(self, x, angles, cache, cache_valid, write_slot, chunk_len: int, write: bool):
    """One chunk against the cache.

    x [B, L, dim]; cache {"k", "v"} [B, C*L, H, D] (C cache slots); cache_valid [C*L] bool;
    write_slot int32 scalar. With write=True the chunk's K/V go into the slot.
    """
    q, k, v = self.project(x)
    q, k = apply_rope(q, angles), apply_rope(k, angles)
    y = kernel_calls.cached_chunk_attention(
        q, k, v, cache["k"], cache["v"], cache_valid, implementation=self.implementation,
        interpret=self.interpret)
    if write:
      start = write_slot * chunk_len
      cache = {
          "k": jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), start, 1),
          "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), start, 1),
      }
    return self.out(y), cache


class CrossAttention(QKVProjection):
  """Attention from video tokens to conditioning tokens; q/k RMSNorm, no RoPE."""

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    """x [B, T, dim], context [B, M, dim] -> [B, T, dim]."""
    q = self.heads(self.norm_q(self.q(x)))
    k = self.heads(self.norm_k(self.k(context)))
    v = self.heads(self.v(context))
    y = jax.nn.dot_product_attention(q, k, v)
    return self.out(y)
