"""--mode=encode (a folder of videos -> VAE latent clips for training and conversion) and
--mode=decode (a latent file -> mp4, decoded chunk by chunk), with the Wan VAE (configs/wan.py).

  # encode: the clips are the data config's latents read back as pixels (1 + 4 (t - 1) frames
  # of 8 h x 8 w for data.num_frames=t, data.frame_size=(h, w)), batched over the mesh
  python main.py --mode=encode --config=configs/wan.py:wan1_3b --workdir=runs/latents \\
      --config.t2v.weights_dir=Wan2.1-T2V-1.3B --config.data.folder=videos/
  # -> prints DIR; train or convert on it:
  python main.py --mode=train --config=configs/wan.py:wan1_3b --workdir=runs/train \\
      --config.data.source=latent_clips --config.data.latents=DIR

  # decode: a .npy of normalised latents [t, h, w, z] (or [1, t, h, w, z]), or clip
  # codec.index of a latent_clips dataset directory
  python main.py --mode=decode --config=configs/wan.py:wan1_3b --workdir=runs/latents \\
      --config.t2v.weights_dir=Wan2.1-T2V-1.3B --config.codec.latents=clip.npy

Decoding streams: `codec.chunk_latents` latents per step through the VAE's causal cache (the
first step gives 1 + 4 (n - 1) frames, each later one 4 n), each step's frames appended to the
mp4 as they come; the video is never held whole. The mp4 is written under a temporary name and
renamed when complete, and an existing output is never overwritten.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from jax.sharding import NamedSharding
from tqdm.auto import tqdm

from data import latent_clips
from data.errors import DataError
from hybrid_video import sharding as sharding_lib
from hybrid_video.errors import UserError
from hybrid_video.nn.vae import StreamingVAE
from hybrid_video.video_io import Mp4Writer, to_uint8
from hybrid_video.weights.wan_folder import find_part, load_streaming_vae


class MeshEncoder:
  """`encode(video)` of a StreamingVAE with the batch sharded over the mesh's batch axes
  (data, fsdp) and the VAE's parameters replicated: each device encodes its clips. Batches whose
  size the batch axes do not divide run replicated (correct, not faster)."""

  def __init__(self, codec: StreamingVAE, mesh=None, rules=None):
    self.codec, self.mesh = codec, mesh
    self.rules = rules or dict(sharding_lib.DEFAULT_RULES)
    if mesh is not None:
      codec.replicate(mesh)

  def encode(self, video) -> np.ndarray:
    if self.mesh is None or isinstance(video, jax.core.Tracer):  # traced: shapes only
      return self.codec.encode(video)
    video = np.asarray(video, np.float32)
    spec = sharding_lib.batch_spec(self.rules, self.mesh, video.shape)
    return np.asarray(self.codec.encode(sharding_lib.put(video, NamedSharding(self.mesh, spec))))


def _vae(config) -> tuple[str, StreamingVAE]:
  path = find_part(config.t2v, "vae")
  return path, load_streaming_vae(path, config.t2v.vae_dtype)


def vae_name(path: str) -> str:
  """Names the VAE weights in the dataset name: the file's absolute path, size and mtime."""
  st = os.stat(path)
  return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def encode_main(config, workdir: str, *, overrides=None) -> str:
  """Encode config.data.folder's clips; returns the latent_clips dataset directory."""
  del overrides  # the config alone says what to encode
  d = config.data
  if not d.folder:
    raise UserError("--mode=encode needs --config.data.folder=FOLDER (the videos to encode)")
  if jax.process_count() > 1:
    raise UserError("--mode=encode runs in one process (it writes one dataset); drop "
                    "--distributed and use a mesh over this host's devices")
  path, codec = _vae(config)
  c = codec.config
  t, (h, w) = int(d.num_frames), (int(s) for s in d.frame_size)
  frames, height, width = 1 + c.time_factor * (t - 1), h * c.space_factor, w * c.space_factor
  mesh = sharding_lib.make_mesh(config.mesh) if config.codec.use_mesh else None
  encoder = MeshEncoder(codec, mesh, sharding_lib.rules_from_config(config.mesh))
  data_dir = d.dir or os.path.join(workdir, "data")
  print(f"encoding clips of {frames} frames of {height}x{width} at {d.fps:g} fps from "
        f"{d.folder} -> {t} latents of {h}x{w}x{c.z_dim} each"
        + (f", batch {config.codec.batch_size} over {mesh.devices.size} devices" if mesh else ""))
  t0 = time.perf_counter()
  try:
    builder = latent_clips.prepare(
        d.folder, encoder, data_dir, vae_name=vae_name(path),
        batch_size=int(config.codec.batch_size), num_frames=frames, height=height, width=width,
        fps=float(d.fps), test_fraction=float(config.codec.test_fraction))
  except DataError as e:
    raise UserError(str(e)) from None
  out = builder.data_path
  counts = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f"latent clips: {out}\n  {counts} in {time.perf_counter() - t0:.1f} s; train on them "
        f"with --config.data.source=latent_clips --config.data.latents={out}")
  return os.fspath(out)


def read_latents(config, z_dim: int) -> tuple[np.ndarray, str]:
  """(latents [t, h, w, z] float32, a name for the output) from config.codec.latents."""
  src = config.codec.latents
  if not src:
    raise UserError("--mode=decode needs --config.codec.latents=FILE.npy or a latent_clips "
                    "dataset directory")
  if not os.path.exists(src):
    raise UserError(f"--config.codec.latents={src} does not exist")
  name = os.path.splitext(os.path.basename(os.path.normpath(src)))[0]
  try:
    if os.path.isdir(src):
      source = latent_clips.LatentSource(src, config.codec.split)
      index = int(config.codec.index)
      if not 0 <= index < len(source):
        raise UserError(f"codec.index={index} is outside the {len(source)} clips of {src}")
      latents, name = source[index], f"{config.codec.split}_{index:05d}"
    else:
      latents = np.load(src, allow_pickle=False)
  except (DataError, ValueError, OSError) as e:
    raise UserError(f"cannot read latents from {src}: {e}") from None
  latents = np.asarray(latents, np.float32)
  if latents.ndim == 5 and latents.shape[0] == 1:
    latents = latents[0]
  if latents.ndim != 4 or latents.shape[-1] != z_dim:
    raise UserError(f"{src} holds an array of shape {latents.shape}; expected normalised "
                    f"latents [t, h, w, {z_dim}] (or [1, t, h, w, {z_dim}])")
  return latents, name


def decode_main(config, workdir: str, *, overrides=None) -> str:
  """Decode config.codec.latents into <workdir>/decoded/<name>.mp4; returns its path."""
  del overrides
  path, codec = _vae(config)
  latents, name = read_latents(config, codec.config.z_dim)
  n = int(config.codec.chunk_latents)
  if n < 1:
    raise UserError(f"codec.chunk_latents must be >= 1, got {n}")
  out = os.path.join(workdir, "decoded", (config.codec.output or name) + ".mp4")
  if os.path.exists(out):
    raise UserError(f"{out} exists; set --config.codec.output=NAME or move it away")
  t, h, w, _ = latents.shape
  tf = codec.config.time_factor
  total = 1 + tf * (t - 1)
  partial = out + ".partial.mp4"
  writer = Mp4Writer(partial, fps=int(config.video_fps), upscale=int(config.video_upscale))
  bar = tqdm(total=total, unit="frame", desc="decoding", disable=not config.progress)
  t0 = time.perf_counter()
  try:
    cache = codec.init_decode_cache(1, h, w)
    for start in range(0, t, n):
      frames, cache = codec.decode_chunk(cache, latents[None, start:start + n])
      frames = np.asarray(frames[0])
      writer.write(to_uint8(frames))
      bar.update(frames.shape[0])
  except BaseException:
    writer.close()
    os.remove(partial)
    raise
  finally:
    bar.close()
  writer.close()
  os.replace(partial, out)
  seconds = time.perf_counter() - t0
  with open(out[:-len(".mp4")] + ".json", "w") as f:
    json.dump({"latents": os.path.abspath(config.codec.latents), "vae": os.path.abspath(path),
               "latent_frames": t, "frames": writer.frames_written, "chunk_latents": n,
               "seconds": seconds, "fps": int(config.video_fps)}, f, indent=1)
  print(f"video: {out}\n  {writer.frames_written} frames from {t} latents, "
        f"{writer.frames_written / max(seconds, 1e-9):.1f} frames/s")
  return out
