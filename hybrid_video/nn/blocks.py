"""The Wan DiT block: AdaLN-modulated self-attention, cross-attention and a GELU MLP.

  x <- x + gate_a * attn(norm1(x) * (1 + scale_a) + shift_a)
  x <- x + cross_attn(norm3(x), context)
  x <- x + gate_m * mlp(norm2(x) * (1 + scale_m) + shift_m)

Modulation is per latent frame: e0 [B, T, 6, dim] acts on the N tokens of each frame.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_video.nn.attention import CrossAttention, SelfAttention
from hybrid_video.nn.hybrid_attention import HybridAttention
from hybrid_video.nn.lora import LoRA, lora_settings


def _frames(x: jax.Array, t: int) -> jax.Array:
  """[B, T*N, dim] -> [B, T, N, dim]."""
  return x.reshape(x.shape[0], t, -1, x.shape[-1])


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """x * (1 + scale) + shift per frame: x [B, T*N, dim], shift/scale [B, T, dim]."""
  t = shift.shape[1]
  out = _frames(x, t) * (1 + scale[:, :, None]) + shift[:, :, None]
  return out.reshape(x.shape).astype(x.dtype)


def gated_residual(x: jax.Array, y: jax.Array, gate: jax.Array) -> jax.Array:
  """x + gate * y per frame: x, y [B, T*N, dim], gate [B, T, dim]."""
  t = gate.shape[1]
  return x + (_frames(y, t) * gate[:, :, None]).reshape(x.shape).astype(x.dtype)


class MLP(nnx.Module):
  """Linear -> GELU(tanh) -> Linear, with optional LoRA deltas on both linears (conversion)."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=None, lora_rank: int = 0,
               lora_alpha: float = 32.0, lora_init: str = "peft"):
    self.fc1 = nnx.Linear(dim, hidden, rngs=rngs, dtype=dtype)
    self.fc2 = nnx.Linear(hidden, dim, rngs=rngs, dtype=dtype)
    if lora_rank:  # a data or a static attribute, decided once
      self.fc1_lora = LoRA(dim, hidden, lora_rank, lora_alpha, rngs=rngs, dtype=dtype,
                           init=lora_init)
      self.fc2_lora = LoRA(hidden, dim, lora_rank, lora_alpha, rngs=rngs, dtype=dtype,
                           init=lora_init)
    else:
      self.fc1_lora = self.fc2_lora = None

  def __call__(self, x):
    if self.fc1_lora is None:
      return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))
    h = jax.nn.gelu(self.fc1(x) + self.fc1_lora(x), approximate=True)
    return self.fc2(h) + self.fc2_lora(h)


class Block(nnx.Module):
  """One transformer block; `hybrid` selects the ARL2 layer instead of softmax attention."""

  def __init__(self, cfg, hybrid: bool, *, rngs: nnx.Rngs):
    dim, dtype = cfg.dim, jnp.dtype(cfg.dtype)
    self.hybrid = hybrid
    lora = lora_settings(cfg)  # LoRA (conversion stage 2) touches hybrid layers only
    self.modulation = nnx.Param(jax.random.normal(rngs.params(), (1, 6, dim)) / dim ** 0.5)
    self.norm1 = nnx.LayerNorm(dim, epsilon=cfg.eps, use_bias=False, use_scale=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, epsilon=cfg.eps, use_bias=False, use_scale=False, rngs=rngs)
    self.norm3 = nnx.LayerNorm(dim, epsilon=cfg.eps, rngs=rngs)
    if hybrid:
      self.self_attn = HybridAttention(
          dim, cfg.num_heads, cfg.eps, rngs=rngs, dtype=dtype,
          attention_impl=cfg.attention_impl, memory_impl=cfg.memory_impl,
          gdn_chunk_size=cfg.gdn_chunk_size, read=cfg.memory.read,
          write_during_denoising=cfg.memory.write_during_denoising,
          memory_lora_rank=lora.memory_rank, memory_lora_alpha=lora.alpha,
          memory_lora_init=lora.init,
          interpret=cfg.get("kernel_interpret", False))
    else:
      self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps, rngs=rngs, dtype=dtype,
                                     implementation=cfg.attention_impl,
                                     interpret=cfg.get("kernel_interpret", False))
    self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps, rngs=rngs, dtype=dtype)
    self.ffn = MLP(dim, cfg.mlp_dim, rngs=rngs, dtype=dtype,
                   lora_rank=lora.mlp_rank if hybrid else 0, lora_alpha=lora.alpha,
                   lora_init=lora.init)

  def _mods(self, e0):
    """e0 [B, T, 6, dim] -> six [B, T, dim] modulations (fp32)."""
    m = self.modulation[...].astype(jnp.float32) + e0.astype(jnp.float32)
    return [m[:, :, i] for i in range(6)]

  def _attn_input(self, x, mods):
    return modulate(self.norm1(x), mods[0], mods[1])

  def _cross_and_mlp(self, x, mods, context):
    x = x + self.cross_attn(self.norm3(x), context)
    return gated_residual(x, self.ffn(modulate(self.norm2(x), mods[3], mods[4])), mods[5])

  def teacher_forcing(self, x_clean, x_noisy, e0_clean, e0_noisy, context, angles, num_chunks):
    """x_* [B, N*L, dim], e0_* [B, T, 6, dim] -> updated (x_clean, x_noisy)."""
    mc, mn = self._mods(e0_clean), self._mods(e0_noisy)
    yc, yn = self.self_attn.teacher_forcing(
        self._attn_input(x_clean, mc), self._attn_input(x_noisy, mn), angles, num_chunks)
    x_clean, x_noisy = gated_residual(x_clean, yc, mc[2]), gated_residual(x_noisy, yn, mn[2])
    t = x_clean.shape[1]
    # The token-wise half runs once over both streams.
    both = jnp.concatenate([x_clean, x_noisy], axis=1)
    mods = [jnp.concatenate([a, b], axis=1) for a, b in zip(mc, mn)]
    both = self._cross_and_mlp(both, mods, context)
    return both[:, :t], both[:, t:]

  def step(self, x, e0, context, angles, layer_carry, cache_ctx, write: bool):
    """One chunk: x [B, L, dim], e0 [B, F, 6, dim] -> (x, layer_carry)."""
    mods = self._mods(e0)
    h = self._attn_input(x, mods)
    if self.hybrid:
      y, state = self.self_attn.step(h, angles, layer_carry["state"], write)
      layer_carry = {"state": state}
    else:
      valid, slot, chunk_len = cache_ctx
      y, layer_carry = self.self_attn.step(h, angles, layer_carry, valid, slot, chunk_len, write)
    x = gated_residual(x, y, mods[2])
    return self._cross_and_mlp(x, mods, context), layer_carry
