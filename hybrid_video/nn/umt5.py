"""The umT5-XXL text encoder (Wan's prompt encoder) in Flax NNX.

  ids [B, S] int32, mask [B, S] (1 = real token) -> embeddings [B, S, dim] float32

  x = token_embedding[ids]
  per layer:  x <- x + o(attn(norm1(x)) + bias_layer)      (unscaled softmax, no biases)
              x <- x + fc2(fc1(norm2(x)) * gelu_tanh(gate(norm2(x))))
  out = norm(x)

- T5 RMSNorm: x / sqrt(mean(x^2) + eps) * scale, no mean and no bias, in float32.
- Attention logits are q.k with no 1/sqrt(D); every layer adds its own relative-position bias
  (umT5; T5 shares one), from bidirectional log buckets; padded keys are masked out. Padded
  queries are computed like real ones (the caller zeroes them, as Wan does).
- Matmuls run in `config.dtype` (bf16 at full size); norms, softmax and the residual stream stay
  in float32, which costs nothing at 512 tokens and keeps bf16 rounding out of the residual.

Parameters carry logical axes (hybrid_video/axes.py) in their `out_sharding` metadata;
`param_shardings` maps them to a mesh through the project's rules, so weights can be placed
sharded as they are loaded (hybrid_video/weights/umt5.py).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from hybrid_video import axes as ax
from hybrid_video import sharding as sharding_lib
from hybrid_video.errors import UserError


@dataclasses.dataclass(frozen=True)
class UMT5Config:
  """umT5-XXL encoder sizes (defaults: the released model) and its dtypes."""
  vocab_size: int = 256384
  dim: int = 4096
  num_heads: int = 64
  head_dim: int = 64
  ffn_dim: int = 10240
  num_layers: int = 24
  num_buckets: int = 32
  max_distance: int = 128
  eps: float = 1e-6
  dtype: str = "bfloat16"        # matmul compute dtype
  param_dtype: str = "bfloat16"  # stored parameter dtype (the released weights are bf16)

  def __post_init__(self):
    for name in ("vocab_size", "dim", "num_heads", "head_dim", "ffn_dim", "num_layers",
                 "max_distance"):
      value = getattr(self, name)
      if value <= 0:
        raise UserError(f"UMT5Config {name}={value} must be positive")
    if self.num_buckets < 4 or self.num_buckets % 4:
      raise UserError(f"UMT5Config num_buckets={self.num_buckets} must be a positive multiple "
                      "of 4 (bidirectional buckets: half per direction, half of those exact)")

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.head_dim

  @classmethod
  def tiny(cls, **overrides) -> "UMT5Config":
    """The test size of tests/fixtures/umt5 (scripts/fixtures/make_umt5.py), in float32."""
    fields = dict(vocab_size=384, dim=32, num_heads=4, head_dim=8, ffn_dim=48, num_layers=2,
                  num_buckets=32, max_distance=128, eps=1e-6, dtype="float32",
                  param_dtype="float32")
    fields.update(overrides)
    return cls(**fields)


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """Bidirectional T5 buckets of (key - query) positions: [q_len, k_len] int32 in [0, buckets).

  Half the buckets per direction; of those, half are exact distances and the rest grow
  logarithmically up to `max_distance`. Computed on the host in float32, the same arithmetic as
  the PyTorch references, so boundary distances (16, 32, 64) land in the same bucket.
  """
  rel = np.arange(k_len, dtype=np.int64)[None, :] - np.arange(q_len, dtype=np.int64)[:, None]
  half = num_buckets // 2
  out = (rel > 0).astype(np.int64) * half
  dist = np.abs(rel)
  max_exact = half // 2
  ratio = np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(max_exact))
  ratio = ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
  large = np.minimum(max_exact + ratio.astype(np.int64), half - 1)
  return (out + np.where(dist < max_exact, dist, large)).astype(np.int32)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple, dtype, std: float) -> nnx.Param:
  value = (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _linear(rngs: nnx.Rngs, d_in: int, d_out: int, axes: tuple, cfg: UMT5Config) -> nnx.Linear:
  init = nnx.with_partitioning(nnx.initializers.normal(d_in ** -0.5), axes, eager_sharding=False)
  return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=init, dtype=jnp.dtype(cfg.dtype),
                    param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


class T5RMSNorm(nnx.Module):
  """x / sqrt(mean(x^2) + eps) * scale in float32, returned in `dtype`."""

  def __init__(self, dim: int, eps: float, *, param_dtype, dtype):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(ax.EMBED,),
                           eager_sharding=False)
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class UMT5Attention(nnx.Module):
  """Bidirectional self-attention with no 1/sqrt(D) scaling and no projection biases."""

  def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
    self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
    self.q = _linear(rngs, cfg.dim, cfg.inner_dim, (ax.EMBED, ax.HEADS), cfg)
    self.k = _linear(rngs, cfg.dim, cfg.inner_dim, (ax.EMBED, ax.HEADS), cfg)
    self.v = _linear(rngs, cfg.dim, cfg.inner_dim, (ax.EMBED, ax.HEADS), cfg)
    self.o = _linear(rngs, cfg.inner_dim, cfg.dim, (ax.HEADS, ax.EMBED), cfg)

  def __call__(self, x: jax.Array, bias: jax.Array, key_valid: jax.Array) -> jax.Array:
    """x [B, S, dim], bias [H, S, S] float32, key_valid [B, S] bool -> [B, S, dim]."""
    b, s, _ = x.shape
    split = lambda y: y.reshape(b, s, self.num_heads, self.head_dim)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(key_valid[:, None, None, :], logits + bias, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    y = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return self.o(y.reshape(b, s, -1))


class GatedFFN(nnx.Module):
  """fc2(fc1(x) * gelu_tanh(gate(x)))."""

  def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
    self.gate = _linear(rngs, cfg.dim, cfg.ffn_dim, (ax.EMBED, ax.MLP), cfg)
    self.fc1 = _linear(rngs, cfg.dim, cfg.ffn_dim, (ax.EMBED, ax.MLP), cfg)
    self.fc2 = _linear(rngs, cfg.ffn_dim, cfg.dim, (ax.MLP, ax.EMBED), cfg)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.fc1(x) * jax.nn.gelu(self.gate(x), approximate=True))


class UMT5Block(nnx.Module):
  """Pre-norm attention and gated FFN; the block owns its relative-position bias table."""

  def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.norm1 = T5RMSNorm(cfg.dim, cfg.eps, param_dtype=param_dtype, dtype=dtype)
    self.attn = UMT5Attention(cfg, rngs=rngs)
    self.pos_embedding = _param(rngs, (cfg.num_buckets, cfg.num_heads), (None, ax.HEADS),
                                param_dtype, 1.0)
    self.norm2 = T5RMSNorm(cfg.dim, cfg.eps, param_dtype=param_dtype, dtype=dtype)
    self.ffn = GatedFFN(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, buckets: np.ndarray, key_valid: jax.Array) -> jax.Array:
    """x [B, S, dim] float32, buckets [S, S], key_valid [B, S] -> [B, S, dim] float32."""
    bias = jnp.transpose(self.pos_embedding[...].astype(jnp.float32)[buckets], (2, 0, 1))
    x = x + self.attn(self.norm1(x), bias, key_valid).astype(jnp.float32)
    x = x + self.ffn(self.norm2(x)).astype(jnp.float32)
    return sharding_lib.constrain(x, ax.ACTIVATION)


class UMT5Encoder(nnx.Module):
  """The umT5 encoder stack: embedding, `num_layers` blocks, a final T5 RMSNorm."""

  def __init__(self, config: UMT5Config, *, rngs: nnx.Rngs):
    self.config = config
    param_dtype = jnp.dtype(config.param_dtype)
    self.token_embedding = _param(rngs, (config.vocab_size, config.dim), (None, ax.EMBED),
                                  param_dtype, 1.0)
    self.blocks = nnx.List([UMT5Block(config, rngs=rngs) for _ in range(config.num_layers)])
    self.norm = T5RMSNorm(config.dim, config.eps, param_dtype=param_dtype, dtype=jnp.float32)

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """ids [B, S] int32, mask [B, S] (nonzero = real token) -> [B, S, dim] float32."""
    if ids.ndim != 2 or ids.shape != mask.shape:
      raise UserError(f"ids.shape={ids.shape} and mask.shape={mask.shape} must be the same "
                      "[batch, tokens]")
    cfg = self.config
    s = ids.shape[1]
    buckets = relative_position_buckets(s, s, cfg.num_buckets, cfg.max_distance)
    key_valid = mask != 0
    x = jnp.take(self.token_embedding[...], ids, axis=0).astype(jnp.float32)
    x = sharding_lib.constrain(x, ax.ACTIVATION)
    for block in self.blocks:
      x = block(x, buckets, key_valid)
    return self.norm(x)


def abstract_encoder(config: UMT5Config) -> UMT5Encoder:
  """The encoder with ShapeDtypeStruct leaves: nothing allocated (weights are loaded into it)."""
  return nnx.eval_shape(lambda: UMT5Encoder(config, rngs=nnx.Rngs(0)))


def param_count(config: UMT5Config) -> int:
  """Number of parameters, counted on abstract shapes."""
  state = nnx.state(abstract_encoder(config), nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def param_shardings(model: UMT5Encoder, mesh: Mesh, rules: dict | None = None) -> nnx.State:
  """NamedSharding per parameter from its logical axes (project rules; undivisible -> replicated).

  `model` may be abstract (`abstract_encoder`); the result has the structure of `nnx.state`.
  """
  rules = dict(sharding_lib.DEFAULT_RULES) if rules is None else rules

  def one(var):
    spec = sharding_lib.logical_to_spec(var.get_metadata().get("out_sharding"), rules, mesh,
                                        var.shape)
    return NamedSharding(mesh, spec)
  return jax.tree.map(one, nnx.state(model), is_leaf=lambda v: isinstance(v, nnx.Variable))
