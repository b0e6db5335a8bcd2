"""LoRA: trainable low-rank deltas on frozen linear maps (conversion stage 2, method doc §6).

  y = x W + b + (alpha / r) (x A) B,    A [in, r],  B [r, out] = 0

Two initialisations of A (`model.lora.init`), both Kaiming-uniform with a = sqrt(5):
- "authors": the ARL2 authors' (`utils/lora.py`, `enable_gdn_lora`): torch's kaiming_uniform_ on
  the [in, r] tensor takes fan_in = r, so A ~ U(-1/sqrt(r), 1/sqrt(r)); the recommended
  conversion default, so a conversion here trains like theirs;
- "peft" (the default when the field is absent, for older configs): PEFT's orientation,
  fan_in = in, so A ~ U(-1/sqrt(in), 1/sqrt(in)).
B starts at zero either way, so a model gains LoRA without changing its output; both draw one key
per factor, so the choice moves no other parameter's initialisation. Where the delta sits:
- the hybrid layers' MLP (fc1, fc2): a plain delta on W, merged into W at export;
- the memory branch's q, k, v inputs: W_q x + b + delta(x) feeds the memory branch only, before
  the q/k RMSNorm, while the intra branch keeps using the shared, frozen W_q x + b. Such a delta
  cannot be merged into the shared W_q (the intra branch would change), nor into phi (the RMSNorm
  sits between them), so the exported plain ARL2 model keeps it as a separate low-rank
  memory-branch projection delta, bit-identical to the trained one.

The model reads its LoRA settings from the optional `model.lora` section (absent = no LoRA):
  rank (0 = off), alpha, mlp (bool: hybrid layers' MLP), memory (bool: memory-branch q, k, v),
  init ("authors" | "peft"; absent = "peft").
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_video.errors import UserError


LORA_INITS = ("authors", "peft")


class LoRAParam(nnx.Param):
  """A LoRA factor. A Param subclass, so parameter counts and checkpoints include it."""


@dataclass(frozen=True)
class LoRASettings:
  rank: int = 0
  alpha: float = 32.0
  mlp: bool = False
  memory: bool = False
  init: str = "peft"

  @property
  def mlp_rank(self) -> int:
    return self.rank if self.mlp else 0

  @property
  def memory_rank(self) -> int:
    return self.rank if self.memory else 0


def lora_settings(model_cfg) -> LoRASettings:
  """The `model.lora` section of a model config (a ConfigDict or dict); absent means no LoRA."""
  section = model_cfg.get("lora") if hasattr(model_cfg, "get") else None
  if not section:
    return LoRASettings()
  get = section.get
  s = LoRASettings(rank=int(get("rank", 0) or 0), alpha=float(get("alpha", 32.0)),
                   mlp=bool(get("mlp", False)), memory=bool(get("memory", False)),
                   init=str(get("init", "peft") or "peft"))
  if s.rank < 0:
    raise UserError(f"model.lora.rank={s.rank} must be >= 0")
  if s.init not in LORA_INITS:
    raise UserError(f"model.lora.init={s.init!r} must be one of {LORA_INITS}")
  return s


class LoRA(nnx.Module):
  """The low-rank delta (alpha / r) (x A) B of one linear map `in_features -> out_features`."""

  def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, *,
               rngs: nnx.Rngs, dtype=None, init: str = "peft"):
    if rank <= 0:
      raise UserError(f"LoRA {rank=} must be positive")
    if init not in LORA_INITS:
      raise UserError(f"LoRA {init=} must be one of {LORA_INITS}")
    self.rank = int(rank)
    self.scale = float(alpha) / self.rank
    self.dtype = dtype
    # kaiming_uniform(a=sqrt(5)) has bound 1/sqrt(fan_in); the two differ in what fan_in is.
    bound = (self.rank if init == "authors" else in_features) ** -0.5
    self.a = LoRAParam(jax.random.uniform(rngs.params(), (in_features, self.rank), jnp.float32,
                                          -bound, bound))
    self.b = LoRAParam(jnp.zeros((self.rank, out_features), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., in] -> delta [..., out] in the compute dtype."""
    dtype = self.dtype or x.dtype
    a, b = self.a[...].astype(dtype), self.b[...].astype(dtype)
    return ((x.astype(dtype) @ a) @ b) * jnp.asarray(self.scale, dtype)

  def delta(self) -> jax.Array:
    """The dense delta (alpha / r) A B [in, out], fp32."""
    return self.scale * jnp.matmul(self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32),
                                   precision=jax.lax.Precision.HIGHEST)


def merge_into(linear: nnx.Linear, lora: LoRA) -> None:
  """W <- W + (alpha / r) A B, in place (the merged layer computes the unmerged output)."""
  kernel = linear.kernel[...]
  linear.kernel[...] = (kernel.astype(jnp.float32) + lora.delta()).astype(kernel.dtype)
