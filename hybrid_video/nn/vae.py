"""The Wan2.1 video VAE in Flax NNX, channels-last, with streaming (cached) encode and decode.

Shapes (one alphabet): video [B, T, H, W, 3] in [-1, 1]; latents [B, t, h, w, z] with
h = H / 8, w = W / 8 (for the released dim_mult) and T = 1 + 4 (t - 1).

Architecture (wan-stack.md §3): causal 3-D convolutions (time padded on the left only), RMS
channel norms, residual blocks, a single-head spatial self-attention per frame in the middle
blocks, stride-2 spatial down/upsampling, and `time_conv`s that halve (encoder) or double
(decoder) the frame rate at the temporal levels.

Streaming: every causal conv keeps the last 2 frames of its input (CACHE_T = 2; the encoder's
stride-2 time_convs keep 1) and prepends them to the next chunk instead of zero padding, so a
video processed chunk by chunk equals the video processed at once: to rounding in fp64
(~1e-15), while in fp32 XLA's shape-dependent conv algorithms leave ~1e-6 relative. The cache
is a `FeatureCache` pytree of fixed shapes plus a static `first` flag (part of the tree
structure, so a jitted step compiles once for the first chunk and once for every later one). The first chunk is special (as in Wan):
- decode: the first latent skips the temporal upsampling and gives 1 frame, each later latent 4,
  so a first chunk of t latents gives 1 + 4 (t - 1) frames and a later one 4 t;
- encode: the first frame passes the temporal downsampling alone, so a first chunk of 1 + 4 k
  frames gives 1 + k latents and a later chunk of 4 k frames gives k.
The released schedule is encode chunks of 1, 4, 4, ... frames.

Latent normalisation: latents = (mu - mean) / std per channel; `decode_chunk` takes normalised
latents. The file is over 400 lines because the module, its cache and its jitted streaming
wrapper are one unit (the cache order is the module's call order).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from hybrid_video.errors import UserError

CACHE_T = 2  # frames a kernel-3 causal conv needs from the previous chunk
RMS_EPS = 1e-12
LOGVAR_RANGE = (-30.0, 20.0)

WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Shape of a Wan2.1-style VAE (defaults: the released one, 126.9 M parameters).

  latents_mean / latents_std: per-channel normalisation; None means Wan2.1's constants when
  z_dim == 16, else mean 0 / std 1.
  """

  base_dim: int = 96
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  temporal_downsample: tuple[bool, ...] = (False, True, True)
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None

  def __post_init__(self):
    for name in ("dim_mult", "temporal_downsample", "latents_mean", "latents_std"):
      if getattr(self, name) is not None:
        object.__setattr__(self, name, tuple(getattr(self, name)))
    if self.base_dim < 1 or self.z_dim < 1 or self.num_res_blocks < 1 or not self.dim_mult:
      raise UserError(f"VAEConfig sizes must be >= 1: {self.base_dim=}, {self.z_dim=}, "
                      f"{self.num_res_blocks=}, {self.dim_mult=}")
    if len(self.temporal_downsample) != len(self.dim_mult) - 1:
      raise UserError(f"{self.temporal_downsample=} must have len(dim_mult) - 1 = "
                      f"{len(self.dim_mult) - 1} entries")
    for name in ("latents_mean", "latents_std"):
      value = getattr(self, name)
      if value is not None and len(value) != self.z_dim:
        raise UserError(f"{name}={value} must have z_dim={self.z_dim} entries")

  @classmethod
  def tiny(cls) -> VAEConfig:
    """The released structure at base_dim 4, z_dim 4 (tests)."""
    return cls(base_dim=4, z_dim=4)

  @property
  def mean(self) -> tuple[float, ...]:
    if self.latents_mean is not None:
      return self.latents_mean
    return WAN21_LATENTS_MEAN if self.z_dim == 16 else (0.0,) * self.z_dim

  @property
  def std(self) -> tuple[float, ...]:
    if self.latents_std is not None:
      return self.latents_std
    return WAN21_LATENTS_STD if self.z_dim == 16 else (1.0,) * self.z_dim

  @property
  def time_factor(self) -> int:
    return 2 ** sum(self.temporal_downsample)

  @property
  def space_factor(self) -> int:
    return 2 ** (len(self.dim_mult) - 1)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["convs"], meta_fields=["first"])
@dataclasses.dataclass(frozen=True)
class FeatureCache:
  """The causal convs' previous frames, in call order; `first`: no chunk has been seen yet."""

  convs: tuple[jax.Array, ...]
  first: bool


def cache_bytes(cache: FeatureCache) -> int:
  """Bytes held by a cache."""
  return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in cache.convs)


class _Walk:
  """Hands out a chunk's cache entries in call order and collects the updated ones."""

  def __init__(self, cache: FeatureCache | None):
    self.old = None if cache is None else cache.convs
    self.first = cache is None or cache.first
    self.new: list[jax.Array] = []

  def take(self) -> jax.Array | None:
    return None if self.old is None else self.old[len(self.new)]

  def put(self, value: jax.Array) -> None:
    self.new.append(value)

  def result(self) -> FeatureCache:
    if self.old is not None and len(self.new) != len(self.old):
      raise UserError(f"cache has {len(self.old)} entries but the model uses {len(self.new)}")
    return FeatureCache(tuple(self.new), first=False)


def _normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
  """N(0, std^2) fp32 init; drawn on the host when the key is concrete, because eager
  jax.random compiles once per shape (minutes for the ~100 shapes of a VAE on CPU)."""
  if isinstance(key, jax.core.Tracer):  # abstract (nnx.eval_shape) or jitted construction
    return jax.random.normal(key, shape, jnp.float32) * std
  seed = np.asarray(jax.random.key_data(key)).ravel()
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32) * std)


class Conv(nnx.Module):
  """A 2-D or 3-D convolution, channels-last: kernel [*k, in, out] (torch's [out, in, *k])."""

  def __init__(self, din: int, dout: int, kernel: tuple[int, ...], *, rngs: nnx.Rngs,
               stride: tuple[int, ...] | None = None, padding=None, dtype=jnp.float32):
    shape = (*kernel, din, dout)
    self.kernel = nnx.Param(_normal(rngs.params(), shape, 1.0 / np.sqrt(np.prod(shape[:-1]))))
    self.bias = nnx.Param(jnp.zeros((dout,), jnp.float32))
    self.stride = tuple(stride or (1,) * len(kernel))
    self.padding = tuple(padding or ((0, 0),) * len(kernel))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [N, *spatial, in] -> [N, *spatial', out]."""
    dn = ("NDHWC", "DHWIO", "NDHWC") if len(self.stride) == 3 else ("NHWC", "HWIO", "NHWC")
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                                     self.stride, self.padding, dimension_numbers=dn)
    return y + self.bias[...].astype(self.dtype)


def _per_frame(conv: Conv, x: jax.Array) -> jax.Array:
  """A 2-D conv on each frame: x [B, T, H, W, C] -> [B, T, H', W', C']."""
  b, t = x.shape[:2]
  y = conv(x.reshape(b * t, *x.shape[2:]))
  return y.reshape(b, t, *y.shape[1:])


class CausalConv3d(Conv):
  """Conv3d padded 2 * (k // 2) frames on the left (from the cache) and symmetrically in space."""

  def __init__(self, din, dout, kernel=(3, 3, 3), *, rngs, dtype=jnp.float32):
    super().__init__(din, dout, kernel, rngs=rngs, dtype=dtype,
                     padding=((0, 0),) + tuple((k // 2, k // 2) for k in kernel[1:]))
    self.context = kernel[0] - 1  # frames of history (0 for a pointwise conv)

  def __call__(self, x: jax.Array, walk: _Walk | None = None) -> jax.Array:
    """x [B, T, H, W, C] -> [B, T, H, W, C']; `walk` supplies and collects the history."""
    if not self.context:
      return super().__call__(x)
    prev = walk.take() if walk is not None else None
    if prev is None:
      prev = jnp.zeros((x.shape[0], self.context, *x.shape[2:]), x.dtype)
    x = jnp.concatenate([prev.astype(x.dtype), x], axis=1)
    if walk is not None:
      walk.put(x[:, -self.context:])
    return super().__call__(x)


class RMSNorm(nnx.Module):
  """Channel L2-normalisation (eps 1e-12) times sqrt(C) * gamma, computed in fp32."""

  def __init__(self, dim: int):
    self.gamma = nnx.Param(jnp.ones((dim,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
    y = xf / jnp.maximum(norm, RMS_EPS) * (x.shape[-1] ** 0.5) * self.gamma[...]
    return y.astype(x.dtype)


class ResBlock(nnx.Module):
  """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a pointwise shortcut if din != dout."""

  def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.norm1 = RMSNorm(din)
    self.conv1 = CausalConv3d(din, dout, rngs=rngs, dtype=dtype)
    self.norm2 = RMSNorm(dout)
    self.conv2 = CausalConv3d(dout, dout, rngs=rngs, dtype=dtype)
    self.shortcut = CausalConv3d(din, dout, (1, 1, 1), rngs=rngs, dtype=dtype) if din != dout \
        else None

  def __call__(self, x: jax.Array, walk: _Walk) -> jax.Array:
    h = x if self.shortcut is None else self.shortcut(x)
    x = self.conv1(jax.nn.silu(self.norm1(x)), walk)
    x = self.conv2(jax.nn.silu(self.norm2(x)), walk)
    return x + h


class Attention(nnx.Module):
  """Single-head self-attention over the H * W positions of each frame (no temporal mixing)."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.norm = RMSNorm(dim)
    self.to_qkv = Conv(dim, 3 * dim, (1, 1), rngs=rngs, dtype=dtype)
    self.proj = Conv(dim, dim, (1, 1), rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, T, H, W, C] -> same shape."""
    b, t, h, w, c = x.shape
    qkv = _per_frame(self.to_qkv, self.norm(x)).reshape(b * t, h * w, 1, 3 * c)
    q, k, v = jnp.split(qkv, 3, axis=-1)  # channel blocks [q | k | v], as torch's chunk(3)
    y = jax.nn.dot_product_attention(q, k, v).reshape(b, t, h, w, c)
    return x + _per_frame(self.proj, y)


class MidBlock(nnx.Module):
  """ResBlock, Attention, ResBlock at the lowest resolution."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.res1 = ResBlock(dim, dim, rngs=rngs, dtype=dtype)
    self.attn = Attention(dim, rngs=rngs, dtype=dtype)
    self.res2 = ResBlock(dim, dim, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array, walk: _Walk) -> jax.Array:
    return self.res2(self.attn(self.res1(x, walk)), walk)


class Resample(nnx.Module):
  """Spatial x2 up/down sampling; the temporal modes add a `time_conv` (see the module doc).

  mode: 'up2d' | 'up3d' (nearest x2, 3x3 conv to dout) or 'down2d' | 'down3d' (zero-pad right
  and bottom by 1, 3x3 conv with stride 2).
  """

  def __init__(self, dim: int, mode: str, *, rngs: nnx.Rngs, dout: int | None = None,
               dtype=jnp.float32):
    self.mode = mode
    if mode.startswith("up"):
      self.conv = Conv(dim, dout or dim // 2, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs,
                       dtype=dtype)
      self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), rngs=rngs, dtype=dtype) \
          if mode == "up3d" else None
    elif mode.startswith("down"):
      self.conv = Conv(dim, dim, (3, 3), stride=(2, 2), padding=((0, 1), (0, 1)), rngs=rngs,
                       dtype=dtype)
      self.time_conv = Conv(dim, dim, (3, 1, 1), stride=(2, 1, 1), rngs=rngs, dtype=dtype) \
          if mode == "down3d" else None
    else:
      raise UserError(f"{mode=} must be one of up2d, up3d, down2d, down3d")

  def _double_frames(self, x: jax.Array, walk: _Walk) -> jax.Array:
    """time_conv to 2C channels whose two halves become frames 2i and 2i + 1."""
    y = self.time_conv(x, walk)
    b, t, h, w, c2 = y.shape
    y = y.reshape(b, t, h, w, 2, c2 // 2)
    return jnp.moveaxis(y, 4, 2).reshape(b, 2 * t, h, w, c2 // 2)

  def _up_time(self, x: jax.Array, walk: _Walk) -> jax.Array:
    if not walk.first:
      return self._double_frames(x, walk)
    # First chunk: latent 0 is not upsampled in time and leaves the cache untouched (zero).
    if x.shape[1] == 1:
      prev = walk.take()
      walk.put(jnp.zeros((x.shape[0], CACHE_T, *x.shape[2:]), x.dtype) if prev is None else prev)
      return x
    return jnp.concatenate([x[:, :1], self._double_frames(x[:, 1:], walk)], axis=1)

  def _down_time(self, x: jax.Array, walk: _Walk) -> jax.Array:
    prev = walk.take()
    walk.put(x[:, -1:])
    if walk.first:  # frame 0 passes alone; windows of 3 (stride 2) start at frame 0
      return x if x.shape[1] == 1 else jnp.concatenate([x[:, :1], self.time_conv(x)], axis=1)
    return self.time_conv(jnp.concatenate([prev.astype(x.dtype), x], axis=1))

  def __call__(self, x: jax.Array, walk: _Walk) -> jax.Array:
    if self.mode == "up3d":
      x = self._up_time(x, walk)
    if self.mode.startswith("up"):
      x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
    x = _per_frame(self.conv, x)
    if self.mode == "down3d":
      x = self._down_time(x, walk)
    return x


class Encoder(nnx.Module):
  """video [B, T, H, W, 3] -> [B, t, h, w, 2 z] (before `quant_conv`)."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
    self.conv_in = CausalConv3d(3, dims[0], rngs=rngs, dtype=dtype)
    layers = []
    for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
      for _ in range(cfg.num_res_blocks):
        layers.append(ResBlock(din, dout, rngs=rngs, dtype=dtype))
        din = dout
      if i < len(cfg.dim_mult) - 1:
        mode = "down3d" if cfg.temporal_downsample[i] else "down2d"
        layers.append(Resample(dout, mode, rngs=rngs, dtype=dtype))
    self.down = nnx.List(layers)
    self.mid = MidBlock(dims[-1], rngs=rngs, dtype=dtype)
    self.norm_out = RMSNorm(dims[-1])
    self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array, walk: _Walk) -> jax.Array:
    x = self.conv_in(x, walk)
    for layer in self.down:
      x = layer(x, walk)
    x = self.mid(x, walk)
    return self.conv_out(jax.nn.silu(self.norm_out(x)), walk)


class Decoder(nnx.Module):
  """latents [B, t, h, w, z] (after `post_quant_conv`) -> frames [B, T, H, W, 3]."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    temporal_upsample = cfg.temporal_downsample[::-1]
    self.conv_in = CausalConv3d(cfg.z_dim, dims[0], rngs=rngs, dtype=dtype)
    self.mid = MidBlock(dims[0], rngs=rngs, dtype=dtype)
    layers = []
    for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
      if i > 0:
        din //= 2  # the previous level's upsampler halved the channels
      for _ in range(cfg.num_res_blocks + 1):
        layers.append(ResBlock(din, dout, rngs=rngs, dtype=dtype))
        din = dout
      if i < len(cfg.dim_mult) - 1:
        mode = "up3d" if temporal_upsample[i] else "up2d"
        layers.append(Resample(dout, mode, rngs=rngs, dtype=dtype))
    self.up = nnx.List(layers)
    self.norm_out = RMSNorm(dims[-1])
    self.conv_out = CausalConv3d(dims[-1], 3, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array, walk: _Walk) -> jax.Array:
    x = self.mid(self.conv_in(x, walk), walk)
    for layer in self.up:
      x = layer(x, walk)
    return self.conv_out(jax.nn.silu(self.norm_out(x)), walk)


class VAE(nnx.Module):
  """The Wan2.1 VAE. Parameters are fp32; `dtype` is the compute dtype (fp32 or bf16)."""

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    z = config.z_dim
    self.config = config
    self.dtype = jnp.dtype(dtype)
    self.out_dtype = jnp.promote_types(self.dtype, jnp.float32)  # fp32 (fp64 in exactness tests)
    self.encoder = Encoder(config, rngs=rngs, dtype=self.dtype)
    self.quant_conv = CausalConv3d(2 * z, 2 * z, (1, 1, 1), rngs=rngs, dtype=self.dtype)
    self.post_quant_conv = CausalConv3d(z, z, (1, 1, 1), rngs=rngs, dtype=self.dtype)
    self.decoder = Decoder(config, rngs=rngs, dtype=self.dtype)

  def _stats(self):
    return (jnp.asarray(self.config.mean, self.out_dtype),
            jnp.asarray(self.config.std, self.out_dtype))

  def _check(self, x: jax.Array, channels: int, what: str) -> None:
    if x.ndim != 5 or x.shape[-1] != channels:
      raise UserError(f"{what} shape {x.shape} must be [B, T, H, W, {channels}]")

  # -------------------------------------------------------------------------- decode

  def decode_chunk(self, cache: FeatureCache | None, latents: jax.Array
                   ) -> tuple[jax.Array, FeatureCache]:
    """Normalised latents [B, t, h, w, z] -> (frames [B, T, 8h, 8w, 3] in [-1, 1], cache).

    T = 1 + 4 (t - 1) for the first chunk (cache None or cache.first), else 4 t.
    """
    self._check(latents, self.config.z_dim, "latents")
    mean, std = self._stats()
    z = latents.astype(self.out_dtype) * std + mean
    walk = _Walk(cache)
    x = self.decoder(self.post_quant_conv(z.astype(self.dtype)), walk)
    return jnp.clip(x.astype(self.out_dtype), -1.0, 1.0), walk.result()

  def decode(self, latents: jax.Array) -> jax.Array:
    """A whole latent video [B, t, h, w, z] -> frames [B, 1 + 4 (t - 1), H, W, 3], in one call
    (eager here; `StreamingVAE.decode` is the jitted one)."""
    return self.decode_chunk(None, latents)[0]

  def decode_cache_spec(self, batch: int, h: int, w: int, first: bool = True) -> FeatureCache:
    """The decode cache's ShapeDtypeStructs for latents of spatial size h x w (no allocation)."""
    return _cache_spec(self, "decode_chunk", (batch, 1, h, w, self.config.z_dim), first)

  def init_decode_cache(self, batch: int, h: int, w: int) -> FeatureCache:
    """Zero cache (first=True) for latents of spatial size h x w."""
    return _zeros(self.decode_cache_spec(batch, h, w))

  # -------------------------------------------------------------------------- encode

  def encode_chunk(self, cache: FeatureCache | None, frames: jax.Array
                   ) -> tuple[jax.Array, FeatureCache]:
    """frames [B, F, H, W, 3] in [-1, 1] -> (moments [B, t, H/8, W/8, 2z] = [mu | logvar], cache).

    F = 1 + 4 k (first chunk, t = 1 + k) or 4 k (later chunks, t = k). Moments are raw
    (not normalised), fp32.
    """
    self._check(frames, 3, "frames")
    walk = _Walk(cache)
    f, tf = frames.shape[1], self.config.time_factor
    if (f - 1 if walk.first else f) % tf:
      raise UserError(f"chunk of {f} frames must be {'1 + ' if walk.first else ''}a multiple "
                      f"of {tf}")
    x = self.quant_conv(self.encoder(frames.astype(self.dtype), walk))
    return x.astype(self.out_dtype), walk.result()

  def encode_cache_spec(self, batch: int, height: int, width: int, first: bool = True
                        ) -> FeatureCache:
    """The encode cache's ShapeDtypeStructs for frames of size height x width."""
    return _cache_spec(self, "encode_chunk", (batch, 1, height, width, 3), first)

  def init_encode_cache(self, batch: int, height: int, width: int) -> FeatureCache:
    """Zero cache (first=True) for frames of size height x width."""
    return _zeros(self.encode_cache_spec(batch, height, width))

  def normalise(self, moments: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """moments [..., 2z] -> normalised latents [..., z]: (mu - mean) / std, or a sample with key."""
    mu, logvar = jnp.split(moments.astype(self.out_dtype), 2, axis=-1)
    if key is not None:
      logvar = jnp.clip(logvar, *LOGVAR_RANGE)
      mu = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape, mu.dtype)
    mean, std = self._stats()
    return (mu - mean) / std

  def encode(self, video: jax.Array, key: jax.Array | None = None, chunk_frames: int = 4
             ) -> jax.Array:
    """video [B, 1 + 4k, H, W, 3] -> normalised latents [B, 1 + k, H/8, W/8, z] (eager).

    Frames go through in chunks of 1, then `chunk_frames` (a multiple of 4).
    """
    moments, cache = [], None
    for frames in split_encode_chunks(video, self.config.time_factor, chunk_frames):
      m, cache = self.encode_chunk(cache, frames)
      moments.append(m)
    return self.normalise(jnp.concatenate(moments, axis=1), key)


def split_encode_chunks(video: jax.Array, time_factor: int = 4, chunk_frames: int = 4
                        ) -> list[jax.Array]:
  """[B, 1 + 4k, ...] -> chunks of 1, chunk_frames, ..., (the last may be shorter, still 4 m)."""
  f = video.shape[1]
  if chunk_frames < 1 or chunk_frames % time_factor:
    raise UserError(f"{chunk_frames=} must be a positive multiple of {time_factor}")
  if (f - 1) % time_factor:
    raise UserError(f"video of {f} frames must have 1 + a multiple of {time_factor} frames")
  return [video[:, :1]] + [video[:, s:s + chunk_frames] for s in range(1, f, chunk_frames)]


def _cache_spec(vae: VAE, method: str, shape: tuple[int, ...], first: bool) -> FeatureCache:
  """Shapes of the cache `method` returns, found by tracing only (works on an abstract VAE)."""
  graphdef, state = nnx.split(vae)
  fn = lambda s, x: getattr(nnx.merge(graphdef, s), method)(None, x)[1]
  spec = jax.eval_shape(fn, state, jax.ShapeDtypeStruct(shape, jnp.float32))
  return FeatureCache(spec.convs, first=first)


def _zeros(spec: FeatureCache) -> FeatureCache:
  return FeatureCache(tuple(jnp.zeros(a.shape, a.dtype) for a in spec.convs), first=spec.first)


class StreamingVAE:
  """Jitted chunk steps of a VAE with the cache donated.

  Each step compiles once for the first chunk and once per later chunk shape; `traces` counts
  the traces per step name. Usage:
    codec = StreamingVAE(vae)
    cache = codec.init_decode_cache(batch, h, w)
    for latents in chunks: frames, cache = codec.decode_chunk(cache, latents)
  """

  def __init__(self, vae: VAE):
    self.config = vae.config
    self.graphdef, self.state = nnx.split(vae)
    self.traces: collections.Counter[str] = collections.Counter()
    self._specs: dict[tuple, FeatureCache] = {}  # tracing for cache shapes costs seconds
    self._decode = jax.jit(functools.partial(self._step, "decode_chunk"), donate_argnums=(1,))
    self._encode = jax.jit(functools.partial(self._step, "encode_chunk"), donate_argnums=(1,))

  def _step(self, method: str, state: Any, cache: FeatureCache, x: jax.Array):
    self.traces[method + ("_first" if cache.first else "")] += 1
    return getattr(nnx.merge(self.graphdef, state), method)(cache, x)

  def replicate(self, mesh) -> "StreamingVAE":
    """Place the parameters on every device of `mesh` (the VAE is small; each device decodes or
    encodes its own batch shard). Returns self."""
    self.state = jax.device_put(self.state, NamedSharding(mesh, PartitionSpec()))
    return self

  @property
  def module(self) -> VAE:
    return nnx.merge(self.graphdef, self.state)

  def _spec(self, method: str, *shape: int) -> FeatureCache:
    if (method, *shape) not in self._specs:
      self._specs[(method, *shape)] = getattr(self.module, method)(*shape)
    return self._specs[(method, *shape)]

  def init_decode_cache(self, batch: int, h: int, w: int) -> FeatureCache:
    """Zero decode cache for latents of spatial size h x w."""
    return _zeros(self._spec("decode_cache_spec", batch, h, w))

  def decode_chunk(self, cache: FeatureCache, latents: jax.Array
                   ) -> tuple[jax.Array, FeatureCache]:
    """(cache, normalised latents [B, t, h, w, z]) -> (frames [B, T, H, W, 3], cache); see
    `VAE.decode_chunk`. The cache passed in is donated: do not reuse it."""
    return self._decode(self.state, cache, latents)

  def decode(self, latents: jax.Array) -> jax.Array:
    """A whole latent video in one step: [B, t, h, w, z] -> [B, 1 + 4 (t - 1), H, W, 3]."""
    b, _, h, w, _ = latents.shape
    return self.decode_chunk(self.init_decode_cache(b, h, w), latents)[0]

  def init_encode_cache(self, batch: int, height: int, width: int) -> FeatureCache:
    """Zero encode cache for frames of size height x width."""
    return _zeros(self._spec("encode_cache_spec", batch, height, width))

  def encode_chunk(self, cache: FeatureCache, frames: jax.Array
                   ) -> tuple[jax.Array, FeatureCache]:
    """(cache, frames) -> (raw moments, cache); see `VAE.encode_chunk`. The cache is donated."""
    return self._encode(self.state, cache, frames)

  def encode(self, video: jax.Array, key: jax.Array | None = None, chunk_frames: int = 4
             ) -> jax.Array:
    """video [B, 1 + 4k, H, W, 3] in [-1, 1] -> normalised latents [B, 1 + k, h, w, z]
    (the mean, or a sample with `key`); chunks of 1, then `chunk_frames` frames."""
    b, _, height, width, _ = video.shape
    cache = self.init_encode_cache(b, height, width)
    moments = []
    for frames in split_encode_chunks(jnp.asarray(video), self.config.time_factor, chunk_frames):
      m, cache = self.encode_chunk(cache, frames)
      moments.append(m)
    return self.module.normalise(jnp.concatenate(moments, axis=1), key)
