"""Shared test utilities: tiny configs and parameter perturbation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.default import get_config
from hybrid_video.nn.model import CausalDiT


def tiny_model_config(ratio: float = 0.75, *, layers=None, frames_per_chunk: int = 2,
                      num_layers: int = 4, cond: str = "labels"):
  cfg = get_config().model
  cfg.prediction = "velocity"  # the formula tests' head; x0 prediction has its own tests
  cfg.null_label = False
  cfg.label_adaln = False    # label tokens through cross-attention only (its own test)
  cfg.label_tokens = 1       # one token per label (several: their own test)
  cfg.dim = 48
  cfg.num_heads = 2          # head dim 24: RoPE bands 8/8/8
  cfg.mlp_dim = 64
  cfg.text_dim = 16
  cfg.num_layers = num_layers
  cfg.patch_size = (1, 4, 4)
  cfg.frames_per_chunk = frames_per_chunk
  cfg.hybrid.ratio = ratio
  cfg.hybrid.layers = layers
  cfg.cond = cond
  cfg.gdn_chunk_size = 8     # L = 2 frames * 16 tokens = 32: several sub-chunks per AR chunk
  return cfg


def perturbed(model: CausalDiT, scale: float = 0.3, seed: int = 0) -> CausalDiT:
  """Adds noise to every parameter, so the zero-initialised head and the small gates of a fresh
  model no longer hide a wrong branch."""
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  # numpy noise: eager jax.random would compile once per parameter shape (seconds each on CPU).
  rng = np.random.default_rng(seed)
  leaves = [jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape), x.dtype)
            for x in leaves]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


def open_memory_gates(model: CausalDiT, bias: float = 3.0) -> CausalDiT:
  """Make the memory branch matter: gamma near 1 and slow decay, so inter is not negligible."""
  for block in model.blocks:
    attn = block.self_attn
    if block.hybrid:
      attn.w_gate.kernel[...] = attn.w_gate.kernel[...] * 0.0 + 0.05
      attn.a_log[...] = jnp.full_like(attn.a_log[...], -3.0)
  return model


def tiny_model(ratio: float = 0.75, seed: int = 0, **kw) -> CausalDiT:
  model = CausalDiT(tiny_model_config(ratio, **kw), rngs=nnx.Rngs(seed))
  return open_memory_gates(perturbed(model, seed=seed + 1))


def jit_call(module, method: str, *args, **static):
  """`module.method(*args, **static)` under a fresh jax.jit: eager dispatch on CPU compiles
  every primitive on its own (tens of seconds for a tiny model's forward). A fresh jit per call,
  so a monkeypatched method is traced anew; keyword arguments are static."""
  graphdef, state = nnx.split(module)
  fn = lambda state, *args: getattr(nnx.merge(graphdef, state), method)(*args, **static)
  return jax.jit(fn)(state, *args)


def rel_err(a, b) -> float:
  """max|a - b| / max|b|, on the host (a and b may live on different device sets)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def random_clips(batch: int, chunks: int, frames_per_chunk: int, hw: int, seed: int = 0):
  """clean, noisy [B, chunks*F, hw, hw, 1], per-chunk t [B, chunks] and labels [B, 1], drawn in
  numpy (no eager compiles). labels are [[3], [7], ...]."""
  rng = np.random.default_rng(seed)
  shape = (batch, chunks * frames_per_chunk, hw, hw, 1)
  clean = rng.uniform(-1, 1, shape).astype(np.float32)
  t = rng.uniform(0.05, 0.95, (batch, chunks)).astype(np.float32)
  tf = np.repeat(t, frames_per_chunk, axis=1)[..., None, None, None]
  noisy = ((1 - tf) * clean + tf * rng.standard_normal(shape)).astype(np.float32)
  return clean, noisy, t, np.array([[3 + 4 * i] for i in range(batch)])

