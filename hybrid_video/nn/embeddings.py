"""Embeddings of the Wan-style DiT: patches, timesteps, conditioning tokens and 3-D RoPE.

Shapes use one alphabet: B batch, T latent frames, Hp/Wp patch rows/columns, N = Hp*Wp tokens
per frame, F frames per chunk, L = F*N tokens per chunk, H heads, D head dim, M conditioning
tokens.
"""

from __future__ import annotations

from hybrid_video.errors import UserError

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Wan's RoPE table covers 1024 positions per axis (`rope_params(1024, ...)`).
ROPE_TABLE_POSITIONS = 1024
# The sinusoid's input is t on Wan's 0..1000 scale; the model's t is the flow time in [0, 1].
TIME_SCALE = 1000.0


def sinusoidal_embedding(positions: jax.Array, dim: int) -> jax.Array:
  """Wan's sinusoidal embedding: [cos, sin] of positions * 10000^(-i/half). [...] -> [..., dim].

  The frequencies are computed in float64 and rounded once (Wan builds them in float64), so
  they do not carry float32 `pow` error into angles of up to 1000 rad.
  """
  half = dim // 2
  freqs = jnp.asarray(np.power(10000.0, -np.arange(half, dtype=np.float64) / half), jnp.float32)
  angles = positions.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class PatchEmbed(nnx.Module):
  """Conv3d(in, dim, kernel = stride = patch) written as a patchify reshape and a linear map.

  The kernel is stored as [pt*ph*pw*C, dim], the flattened Conv3d kernel, so weights port from
  a Conv3d by a transpose and reshape.
  """

  def __init__(self, in_channels: int, dim: int, patch_size, *, rngs: nnx.Rngs):
    self.patch_size = tuple(patch_size)
    fan_in = in_channels * math.prod(self.patch_size)
    self.proj = nnx.Linear(fan_in, dim, rngs=rngs)

  def __call__(self, video: jax.Array) -> jax.Array:
    """video [B, T, Hi, Wi, C] -> tokens [B, T/pt, Hp, Wp, dim]."""
    return self.proj(patchify(video, self.patch_size))


def patchify(video: jax.Array, patch_size) -> jax.Array:
  """[B, T, Hi, Wi, C] -> [B, T/pt, Hp, Wp, pt*ph*pw*C]."""
  b, t, h, w, c = video.shape
  pt, ph, pw = patch_size
  x = video.reshape(b, t // pt, pt, h // ph, ph, w // pw, pw, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, t // pt, h // ph, w // pw, pt * ph * pw * c)


def unpatchify(x: jax.Array, patch_size, channels: int) -> jax.Array:
  """[B, Tp, Hp, Wp, pt*ph*pw*C] -> [B, Tp*pt, Hp*ph, Wp*pw, C]."""
  b, tp, hp, wp, _ = x.shape
  pt, ph, pw = patch_size
  x = x.reshape(b, tp, hp, wp, pt, ph, pw, channels)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(b, tp * pt, hp * ph, wp * pw, channels)


class TimeEmbed(nnx.Module):
  """sinusoid(256) -> Linear -> SiLU -> Linear = e; SiLU -> Linear(dim, 6*dim) = e0.

  Computed per latent frame so that every chunk carries its own noise level.
  """

  def __init__(self, freq_dim: int, dim: int, *, rngs: nnx.Rngs):
    self.freq_dim = freq_dim
    self.dim = dim
    self.fc1 = nnx.Linear(freq_dim, dim, rngs=rngs)
    self.fc2 = nnx.Linear(dim, dim, rngs=rngs)
    self.proj = nnx.Linear(dim, 6 * dim, rngs=rngs)

  def __call__(self, t: jax.Array, extra: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """t [B, T] in [0, 1] -> (e [B, T, dim], e0 [B, T, 6, dim]), both fp32.

    The sinusoid sees 1000 t: Wan's timestep on its 0..1000 scale (flow sigma * 1000).
    extra [B, dim]: added to e before the modulation projection (model.label_adaln).
    """
    s = sinusoidal_embedding(t * TIME_SCALE, self.freq_dim)
    e = self.fc2(jax.nn.silu(self.fc1(s)))
    if extra is not None:
      e = e + extra[:, None, :].astype(e.dtype)
    e0 = self.proj(jax.nn.silu(e))
    return e, e0.reshape(*e0.shape[:-1], 6, self.dim)


class ConditionEmbed(nnx.Module):
  """Conditioning tokens for cross-attention.

  kind = "labels": learned label tokens (`label_tokens` per digit label) [decision for the tiny
    configs]; with null_label, one more label (index num_classes) stands for "no label"
    (classifier-free guidance: train.label_dropout, sampler.guidance). With one token per label
    the cross-attention's softmax runs over one key, so its output is the same vector for every
    video token (a per-label bias); several tokens let each video token read its own mix;
  kind = "none": one learned null token (unconditional);
  kind = "embeddings": external embeddings (umT5 in Wan) of width text_dim.
  Then Wan's text embedding: Linear(text_dim, dim) -> GELU(tanh) -> Linear(dim, dim).
  """

  def __init__(self, kind: str, num_classes: int, text_dim: int, dim: int, *, rngs: nnx.Rngs,
               null_label: bool = False, label_tokens: int = 1):
    if kind not in ("labels", "none", "embeddings"):
      raise UserError(f"model.cond={kind!r} must be one of 'labels', 'none', 'embeddings'")
    if label_tokens < 1:
      raise UserError(f"model.label_tokens={label_tokens} must be >= 1")
    self.kind = kind
    self.label_tokens = label_tokens
    self.text_dim = text_dim
    if kind == "labels":
      self.table = nnx.Embed(num_classes + int(null_label), text_dim * label_tokens, rngs=rngs)
    elif kind == "none":
      self.null = nnx.Param(jax.random.normal(rngs.params(), (1, 1, text_dim)) * 0.02)
    self.fc1 = nnx.Linear(text_dim, dim, rngs=rngs)
    self.fc2 = nnx.Linear(dim, dim, rngs=rngs)

  def __call__(self, cond, batch: int) -> jax.Array:
    """cond: labels [B, M] int, embeddings [B, M, text_dim], or None -> [B, M', dim]
    (M' = M * label_tokens for labels, else M)."""
    if self.kind == "labels":
      if cond is None:
        raise UserError("model.cond='labels' needs integer labels [B, M]")
      tokens = self.table(cond)
      tokens = tokens.reshape(*cond.shape[:-1], cond.shape[-1] * self.label_tokens, self.text_dim)
    elif self.kind == "embeddings":
      if cond is None:
        raise UserError("model.cond='embeddings' needs conditioning embeddings [B, M, text_dim]")
      tokens = cond
    else:
      tokens = jnp.broadcast_to(self.null[...], (batch, *self.null.shape[1:]))
    return self.fc2(jax.nn.gelu(self.fc1(tokens), approximate=True))


# ----------------------------------------------------------------------------------------------
# 3-D RoPE with Wan's band split.


def rope_bands(head_dim: int) -> tuple[int, int, int]:
  """Dimensions of the time, height and width bands: D - 4*(D//6), 2*(D//6), 2*(D//6)."""
  if head_dim % 2:
    raise UserError(f"{head_dim=} must be even for RoPE")
  d6 = head_dim // 6
  return head_dim - 4 * d6, 2 * d6, 2 * d6


def _inv_freq64(band: int, theta: float) -> np.ndarray:
  return 1.0 / np.power(theta, np.arange(0, band, 2, dtype=np.float64) / band)


def _inv_freq(band: int, theta: float) -> jax.Array:
  return jnp.asarray(_inv_freq64(band, theta), jnp.float32)


@functools.lru_cache(maxsize=None)
def _frame_table(band: int, theta: float) -> np.ndarray:
  return _table_angles(np.arange(ROPE_TABLE_POSITIONS, dtype=np.float64), band, theta)


def _table_angles(positions: np.ndarray, band: int, theta: float) -> np.ndarray:
  """Angles of integer positions, computed in float64 and reduced mod 2 pi before the float32
  rounding: cos/sin of them match Wan's float64 table to ~1e-7 at any of its 1024 positions
  (an unreduced float32 angle of ~1000 rad is off by ~6e-5)."""
  return np.mod(positions[:, None] * _inv_freq64(band, theta), 2 * np.pi).astype(np.float32)


def _frame_angles(frame_start, num_frames: int, band: int, theta: float) -> jax.Array:
  """[F, band/2] time-band angles of frames frame_start .. frame_start + F - 1.

  Frames inside Wan's 1024-position table read it (float64, reduced); later frames, which Wan
  cannot represent, use the analytic float32 angle **[decision]**.
  """
  table = _frame_table(band, theta)
  if isinstance(frame_start, (int, np.integer)) and frame_start + num_frames <= len(table):
    return jnp.asarray(table[frame_start:frame_start + num_frames])
  f = jnp.asarray(frame_start, jnp.int32) + jnp.arange(num_frames, dtype=jnp.int32)
  inside = jnp.take(jnp.asarray(table), jnp.minimum(f, len(table) - 1), axis=0)
  analytic = f.astype(jnp.float32)[:, None] * _inv_freq(band, theta)
  return jnp.where((f < len(table))[:, None], inside, analytic)


def rope_angles(frame_start, num_frames: int, grid_h: int, grid_w: int, head_dim: int,
                theta: float = 10000.0) -> jax.Array:
  """Rotation angles [F*Hp*Wp, D/2] for frames frame_start .. frame_start+F-1, raster order.

  Wan's table: frame positions offset by the chunk's start frame (Causal-Forcing's
  `causal_rope_apply`), row and column positions from 0. Frames beyond the table's 1024 rows get
  analytic angles **[decision]**; see README "Positions beyond 1024 frames".
  `frame_start` may be a traced int32 scalar (the sampler's chunk offset).
  """
  bt, bh, bw = rope_bands(head_dim)
  af = _frame_angles(frame_start, num_frames, bt, theta)
  ah = jnp.asarray(_table_angles(np.arange(grid_h, dtype=np.float64), bh, theta))
  aw = jnp.asarray(_table_angles(np.arange(grid_w, dtype=np.float64), bw, theta))
  shape = (num_frames, grid_h, grid_w)
  angles = jnp.concatenate([
      jnp.broadcast_to(af[:, None, None, :], (*shape, af.shape[-1])),
      jnp.broadcast_to(ah[None, :, None, :], (*shape, ah.shape[-1])),
      jnp.broadcast_to(aw[None, None, :, :], (*shape, aw.shape[-1])),
  ], axis=-1)
  return angles.reshape(-1, head_dim // 2)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotate adjacent pairs (0,1), (2,3), ... x [B, T, H, D], angles [T, D/2] -> [B, T, H, D]."""
  dtype = x.dtype
  x = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x0, x1 = x[..., 0], x[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return out.reshape(*out.shape[:-2], -1).astype(dtype)
