"""The parts of a Wan2.1 weights folder (original or diffusers layout): where each lives, and
their model configs. Read by text to video (`--mode=sample`) and by `--mode=encode` /
`--mode=decode` (the VAE alone)."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp

from hybrid_video.errors import UserError
from hybrid_video.nn.umt5 import UMT5Config
from hybrid_video.nn.vae import StreamingVAE, VAEConfig
from hybrid_video.weights.wan_vae import load_vae

# Where each part lives in a weights folder: the original Wan release, then the diffusers one.
PARTS = {
    "vae": ("Wan2.1_VAE.pth", "Wan2.1_VAE.safetensors", "vae"),
    "text_encoder": ("models_t5_umt5-xxl-enc-bf16.pth", "models_t5_umt5-xxl-enc-bf16.safetensors",
                     "text_encoder"),
    "tokenizer": (os.path.join("google", "umt5-xxl"), "tokenizer"),
}


def find_part(tcfg, part: str) -> str:
  """The path of a weights part: t2v.<part> when set, else found in t2v.weights_dir."""
  explicit = tcfg.get(part)
  if explicit:
    if not os.path.exists(explicit):
      raise UserError(f"--config.t2v.{part}={explicit} does not exist")
    return explicit
  folder = tcfg.weights_dir
  if not folder:
    raise UserError(f"set --config.t2v.weights_dir=FOLDER (the Wan2.1 weights) or "
                    f"--config.t2v.{part}=PATH")
  if not os.path.isdir(folder):
    raise UserError(f"weights folder {folder} does not exist")
  for name in PARTS[part]:
    if os.path.exists(os.path.join(folder, name)):
      return os.path.join(folder, name)
  raise UserError(f"weights folder {folder} has no {part.replace('_', ' ')} (looked for "
                  f"{', '.join(PARTS[part])})")


def _json_config(path: str) -> dict | None:
  config = os.path.join(path, "config.json") if os.path.isdir(path) else None
  if config and os.path.exists(config):
    with open(config) as f:
      return json.load(f)
  return None


def vae_config(path: str) -> VAEConfig:
  """A diffusers `vae/` folder's config.json, else the released Wan2.1 VAE."""
  c = _json_config(path)
  if c is None:
    return VAEConfig()
  return VAEConfig(base_dim=c["base_dim"], z_dim=c["z_dim"], dim_mult=tuple(c["dim_mult"]),
                   num_res_blocks=c["num_res_blocks"],
                   temporal_downsample=tuple(c["temperal_downsample"]),
                   latents_mean=c.get("latents_mean"), latents_std=c.get("latents_std"))


def umt5_config(path: str, dtype: str) -> UMT5Config:
  """An HF `text_encoder/` folder's config.json, else umT5-XXL."""
  c = _json_config(path)
  if c is None:
    return UMT5Config(dtype=dtype, param_dtype=dtype)
  return UMT5Config(
      vocab_size=c["vocab_size"], dim=c["d_model"], num_heads=c["num_heads"],
      head_dim=c["d_kv"], ffn_dim=c["d_ff"], num_layers=c["num_layers"],
      num_buckets=c["relative_attention_num_buckets"],
      max_distance=c["relative_attention_max_distance"], eps=c["layer_norm_epsilon"],
      dtype=dtype, param_dtype=dtype)


def load_streaming_vae(path: str, dtype: str = "float32") -> StreamingVAE:
  """The VAE at `path` (a part found by `find_part`) with its jitted chunk steps."""
  return StreamingVAE(load_vae(path, vae_config(path), dtype=jnp.dtype(dtype)))
