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

from hybrid_video import sharding as sharding_lib
from hybrid_video.errors import UserError
from hybrid_video.restore import load_model
from hybrid_video.text import PromptCache, TextEncoder
from hybrid_video.text_to_video import TextToVideo, parse_prompt_schedule, read_prompt_file
from hybrid_video.video_io import Mp4Writer, to_uint8
from hybrid_video.weights.wan_folder import PARTS, find_part, load_streaming_vae, umt5_config

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
  # On a mesh (sampler.use_mesh): the DiT's parameters and carry, and umT5's parameters, are
  # sharded over it (config.mesh); the VAE's are replicated.
  mesh = sharding_lib.make_mesh(config.mesh) if config.sampler.use_mesh else None
  rules = sharding_lib.rules_from_config(config.mesh) if mesh is not None else None
  t0 = time.perf_counter()
  encoder = TextEncoder.from_pretrained(parts["text_encoder"], parts["tokenizer"],
                                        umt5_config(parts["text_encoder"], tcfg.text_dtype),
                                        mesh=mesh, rules=rules)
  if config.model.cond != "embeddings" or encoder.dim != int(config.model.text_dim):
    raise UserError(f"the text encoder gives {encoder.dim}-wide embeddings but the DiT takes "
                    f"model.cond={config.model.cond!r}, model.text_dim={config.model.text_dim}")
  cache = PromptCache(os.path.join(workdir, "prompt_cache"), encoder)
  vae = load_streaming_vae(parts["vae"], tcfg.vae_dtype)
  load_seconds = time.perf_counter() - t0
  latent_hw = tuple(int(s) for s in config.data.frame_size)
  t2v = TextToVideo(model, config.sampler, vae, cache.get_or_encode, latent_hw=latent_hw,
                    mesh=mesh, rules=rules)
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
