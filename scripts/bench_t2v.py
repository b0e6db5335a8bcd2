"""Text-to-video figures: the tiny stack streaming on CPU, and the full-size memory on 1 and 8
devices from abstract shapes.

  .venv/bin/python -m scripts.bench_t2v [--chunks 100] [--skip-full] [--skip-tiny]

1. CPU, tiny random weights in the real on-disk layouts (tests/fixtures: the DiT of
   configs/wan.py:tiny_t2v, the tiny VAE, umT5 and tokenizer): one prompt streamed for
   `--chunks` chunks through the DiT and the VAE. Prints frames per second, the carry bytes after
   every chunk (they must not grow: ARL2 keeps a fixed-size state and the softmax layers a
   bounded cache), the VAE cache bytes, and the fitted exponent alpha of per-chunk time against
   chunk index (time ~ n^alpha; constant cost per chunk is alpha ~ 0).
2. Full size, nothing allocated (8 fake CPU devices; XLA's CPU buffer assignment estimates
   GPU/TPU memory, it does not measure it): umT5-XXL's forward on 512 tokens (bf16) and one
   ARL2-75% sampler step of Wan2.1-1.3B at 480x832 with a 231-latent-frame history
   (configs/arl2_wan1_3b.py), each on one device and on 8 (fsdp=8), with the verdict
   against an 80 GiB device.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import arl2_wan1_3b, wan
from hybrid_video import sharding as sharding_lib
from hybrid_video.modes.compile import compile_steps, measure, verdict
from hybrid_video.nn import umt5
from hybrid_video.text import PromptCache, TextEncoder
from hybrid_video.text_to_video import TextToVideo
from hybrid_video.weights import wan_dit
from hybrid_video.weights.wan_folder import load_streaming_vae, umt5_config

GIB = 2 ** 30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def tiny(num_chunks: int, hybrid_ratio: float) -> None:
  """Stream one prompt through the fixture stack; the fixture DiT is all softmax, and with
  hybrid_ratio > 0 it is imported into hybrid layers (new parameters initialised as conversion
  does: phi = I, the gate init), as --mode=import does for a hybrid config."""
  config = wan.get_config("tiny_t2v")
  config.model.hybrid.ratio = hybrid_ratio
  config.weights.path = os.path.join(FIXTURES, "t2v", "transformer")
  with tempfile.TemporaryDirectory() as tmp:
    model = wan_dit.load_model(config.model, config.weights)
    text = os.path.join(FIXTURES, "umt5", "hf")
    encoder = TextEncoder.from_pretrained(text, os.path.join(FIXTURES, "umt5", "tokenizer"),
                                          umt5_config(text, "float32"))
    cache = PromptCache(os.path.join(tmp, "prompt_cache"), encoder)
    vae = load_streaming_vae(os.path.join(FIXTURES, "vae", "diffusers"))
    t2v = TextToVideo(model, config.sampler, vae, cache.get_or_encode,
                      latent_hw=tuple(config.data.frame_size))
    f = model.frames_per_chunk
    num_frames = 1 + 4 * (f * num_chunks - 1)
    stats = t2v.stream([(0, "a cat walks on the grass")], num_frames, progress=False)
  seconds = np.asarray(stats.chunk_seconds[2:])  # after the first-chunk and later-chunk compiles
  n = np.arange(3, len(stats.chunk_seconds) + 1)
  keep = seconds < 5 * np.median(seconds)      # drop the chunks that recompiled (cache growth)
  alpha = np.polyfit(np.log(n[keep]), np.log(seconds[keep]), 1)[0]
  carry = sorted(set(stats.carry_bytes))
  name = "all softmax (as released)" if not hybrid_ratio else f"ARL2 {hybrid_ratio:.0%} hybrid"
  print(f"tiny T2V on CPU, {name}: {stats.num_frames} frames in {stats.num_chunks} chunks; "
        f"steady {4 * f / np.median(seconds):.1f} frames/s (median chunk "
        f"{1e3 * np.median(seconds):.1f} ms for {4 * f} frames), "
        f"{stats.num_frames / stats.wall_seconds:.1f} frames/s overall with compiles; "
        f"alpha = {alpha:+.3f}; carry bytes: {carry[0]:,}"
        + (f" (constant over {len(stats.carry_bytes)} chunks)" if len(carry) == 1 else
           f" .. {carry[-1]:,} (grows: {len(carry)} sizes)")
        + f"; VAE cache {stats.vae_cache_bytes:,} B; sampler compiles {stats.sampler_compiles}")


def _line(name: str, stats: dict) -> str:
  return (f"  {name:38s} args {stats['argument_size_in_bytes'] / GIB:7.2f} GiB  temps "
          f"{stats['temp_size_in_bytes'] / GIB:7.2f} GiB  total "
          f"{stats['total_per_device_bytes'] / GIB:7.2f} GiB  ({stats['verdict']}; compiled in "
          f"{stats['compile_seconds']:.0f} s)")


def encoder_step(mesh, dtype: str = "bfloat16", tokens: int = 512) -> dict:
  config = dataclasses.replace(umt5.UMT5Config(), dtype=dtype, param_dtype=dtype)
  model = umt5.abstract_encoder(config)
  graphdef, state = nnx.split(model)
  shardings = umt5.param_shardings(model, mesh)
  state = jax.tree.map(
      lambda v, s: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype,
                                                sharding=s)),
      state, shardings, is_leaf=lambda v: isinstance(v, nnx.Variable))
  ids = jax.ShapeDtypeStruct((1, tokens), jnp.int32, sharding=NamedSharding(mesh, P()))

  @jax.jit
  def forward(state, ids, mask):
    out = nnx.merge(graphdef, state)(ids, mask)
    return out * mask[..., None].astype(out.dtype)

  stats = measure(forward, (state, ids, ids), mesh, dict(sharding_lib.DEFAULT_RULES))
  stats["verdict"] = verdict(stats["total_per_device_bytes"], 80.0)
  return stats


def full() -> None:
  config = arl2_wan1_3b.get_config()
  rules = sharding_lib.rules_from_config(config.mesh)
  for devices in (1, 8):
    mesh_cfg = config.mesh
    mesh_cfg.data, mesh_cfg.fsdp = 1, devices
    mesh = sharding_lib.make_mesh(mesh_cfg, jax.devices()[:devices])
    print(f"full size on {devices} device(s) (mesh {dict(mesh.shape)}):")
    print(_line("umT5-XXL forward, 512 tokens, bf16", encoder_step(mesh)))
    sample = compile_steps(config, mesh, rules, ("sample",), echo=False)["sample"]
    print(_line(f"ARL2-75% sampler step, {sample['history_latent_frames']}-latent history",
                sample))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--chunks", type=int, default=100)
  parser.add_argument("--skip-tiny", action="store_true")
  parser.add_argument("--skip-full", action="store_true")
  args = parser.parse_args()
  t0 = time.perf_counter()
  if not args.skip_tiny:
    for ratio in (1.0, 0.0):
      tiny(args.chunks, ratio)
  if not args.skip_full:
    full()
  print(f"({time.perf_counter() - t0:.0f} s; {jax.device_count()} {jax.default_backend()} "
        "devices)")


if __name__ == "__main__":
  main()
