"""--mode=sample for a text-to-video model (configs/wan.py): prompts -> umT5 -> the streaming DiT
(the workdir's checkpoint, e.g. from --mode=import) -> the streaming Wan VAE -> mp4 at 16 fps,
written as chunks arrive.

  python main.py --mode=sample --config=configs/wan.py:arl2 --workdir=runs/arl2 \\
      --config.t2v.weights_dir=Wan2.1-T2V-1.3B --config.t2v.prompt='a cat walks on the grass' \\
      --config.sampler.num_frames=961

`t2v.prompt` is one prompt or a schedule ('0:"a cat walks" 120:"the cat sits down"');
`t2v.prompt_file` holds one prompt (or schedule) per line, one video each, with seed
sampler.seed + line index. Each video `samples/t2v_<i>_seed<s>.mp4` gets a JSON beside it
(prompt, seed, config, weights, timings). An mp4 is written under a temporary name and renamed
when complete, so a failed run leaves no partial video. The text encoder runs once per distinct
prompt: embeddings are cached in <workdir>/prompt_cache.
"""

from __future__ import annotations

import json
import os
import time

import jax.numpy as jnp

from hybrid_video.errors import UserError
from hybrid_video.nn.umt5 import UMT5Config
from hybrid_video.nn.vae import StreamingVAE, VAEConfig
from hybrid_video.restore import load_model
from hybrid_video.text import PromptCache, TextEncoder
from hybrid_video.text_to_video import TextToVideo, parse_prompt_schedule, read_prompt_file
from hybrid_video.video_io import Mp4Writer, to_uint8
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


def prompts_of(tcfg) -> list[str]:
  if tcfg.prompt_file:
    return read_prompt_file(tcfg.prompt_file)
  if not (tcfg.prompt or "").strip():
    raise UserError("set --config.t2v.prompt='...' or --config.t2v.prompt_file=FILE")
  return [tcfg.prompt]


def sample_text_main(config, workdir: str, *, overrides=None) -> list[str]:
  """Stream one video per prompt (or schedule); returns the mp4 paths."""
  tcfg = config.t2v
  schedules = [parse_prompt_schedule(p) for p in prompts_of(tcfg)]
  num_frames = int(config.sampler.num_frames)
  parts = {p: find_part(tcfg, p) for p in PARTS}
  # The DiT: the workdir's checkpoint (written by --mode=import or --mode=convert).
  model, config, step = load_model(config, workdir, config.train.resume_step,
                                   cli_overrides=overrides)
  t0 = time.perf_counter()
  encoder = TextEncoder.from_pretrained(parts["text_encoder"], parts["tokenizer"],
                                        umt5_config(parts["text_encoder"], tcfg.text_dtype))
  if config.model.cond != "embeddings" or encoder.dim != int(config.model.text_dim):
    raise UserError(f"the text encoder gives {encoder.dim}-wide embeddings but the DiT takes "
                    f"model.cond={config.model.cond!r}, model.text_dim={config.model.text_dim}")
  cache = PromptCache(os.path.join(workdir, "prompt_cache"), encoder)
  vae = StreamingVAE(load_vae(parts["vae"], vae_config(parts["vae"]),
                              dtype=jnp.dtype(tcfg.vae_dtype)))
  load_seconds = time.perf_counter() - t0
  latent_hw = tuple(int(s) for s in config.data.frame_size)
  t2v = TextToVideo(model, config.sampler, vae, cache.get_or_encode, latent_hw=latent_hw)
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for i, schedule in enumerate(schedules):
    seed = int(config.sampler.seed) + i
    path = os.path.join(out_dir, f"t2v_{i:03d}_seed{seed}.mp4")
    partial = path + ".partial.mp4"
    hits = cache.stats.hits
    writer = Mp4Writer(partial, fps=int(config.video_fps), upscale=int(config.video_upscale))
    try:
      stats = t2v.stream(schedule, num_frames, seed=seed, progress=bool(config.progress),
                         on_frames=lambda f: writer.write(to_uint8(f)))
    except BaseException:
      writer.close()
      os.remove(partial)
      raise
    writer.close()
    os.replace(partial, path)
    record = {
        "prompt": schedule if len(schedule) > 1 else schedule[0][1], "seed": seed,
        "num_frames": stats.num_frames, "fps": int(config.video_fps),
        "chunks": stats.num_chunks, "prompt_cache_hits": cache.stats.hits - hits,
        "weights": {"dit_checkpoint": os.path.abspath(workdir), "dit_step": step,
                    **{k: os.path.abspath(v) for k, v in parts.items()}},
        "timings": {"load_seconds": load_seconds, "stream_seconds": stats.wall_seconds,
                    "frames_per_second": stats.num_frames / max(stats.wall_seconds, 1e-9),
                    "chunk_seconds": stats.chunk_seconds},
        "carry_bytes": stats.carry_bytes[-1], "vae_cache_bytes": stats.vae_cache_bytes,
        "config": json.loads(config.to_json_best_effort()),
    }
    with open(path[:-len(".mp4")] + ".json", "w") as f:
      json.dump(record, f, indent=1)
    print(f"video: {path}\n  {stats.num_frames} frames, {stats.num_chunks} chunks, "
          f"{record['timings']['frames_per_second']:.2f} frames/s, carry {stats.carry_bytes[-1]} "
          f"bytes; prompt cache hits {record['prompt_cache_hits']}")
    paths.append(path)
  return paths
