"""The streaming sampler's host loop: one jitted per-chunk step with a donated carry.

for each chunk n: denoise (reads only) -> emit -> context pass at t = 0 (writes K/V and S_n).
With every layer hybrid the carry has fixed shapes, so one executable serves every chunk.
Softmax layers with an unbounded cache grow it by doubling (one compile per doubling).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from hybrid_video.chunk_runner import ChunkRunner
from hybrid_video.errors import UserError
from hybrid_video.model import CausalDiT, carry_bytes


@dataclass
class StreamStats:
  num_frames: int = 0
  num_chunks: int = 0
  compiles: int = 0
  carry_bytes: list[int] = field(default_factory=list)   # after each chunk
  chunk_seconds: list[float] = field(default_factory=list)
  wall_seconds: float = 0.0
  labels: list | None = None                             # conditioning labels, if any


def check_num_frames(num_frames) -> int:
  if not isinstance(num_frames, (int, np.integer)) or num_frames <= 0:
    raise UserError(f"num_frames={num_frames!r} must be a positive integer")
  return int(num_frames)


class StreamingSampler(ChunkRunner):
  """A ChunkRunner that streams whole videos: the compiled per-chunk step for one model,
  sampler config and chunk shape (mesh/rules: see ChunkRunner)."""

  def stream(self, num_frames: int, cond=None, *, seed: int = 0,
             on_frames: Callable[[np.ndarray], None] | None = None,
             progress: bool = True) -> StreamStats:
    """Generate `num_frames` frames chunk by chunk; on_frames gets float [B, F', H, W, C] each chunk."""
    num_frames = check_num_frames(num_frames)
    f = self.model.frames_per_chunk
    num_chunks = math.ceil(num_frames / f)
    key, context = self.prepare(seed, cond)
    carry = self.init_carry()
    stats = StreamStats(num_frames=num_frames, num_chunks=num_chunks)
    start = time.perf_counter()
    bar = tqdm(total=num_frames, unit="frame", disable=not progress, desc="sampling")
    for n in range(num_chunks):
      carry = self.reserve(carry, n)
      t0 = time.perf_counter()
      carry, frames = self.generate(carry, key, context)
      frames = np.asarray(frames)[:, :num_frames - n * f]  # blocks until the chunk is done
      stats.chunk_seconds.append(time.perf_counter() - t0)
      stats.carry_bytes.append(carry_bytes(carry))
      if on_frames is not None:
        on_frames(frames)
      bar.update(frames.shape[1])
      elapsed = time.perf_counter() - start
      bar.set_postfix(fps=f"{bar.n / max(elapsed, 1e-9):.1f}",
                      carry=f"{stats.carry_bytes[-1] / 2**20:.2f}MiB")
    bar.close()
    stats.wall_seconds = time.perf_counter() - start
    stats.compiles = self.compiles
    return stats


def sample_labels(config, batch: int, seed: int) -> np.ndarray:
  """Random digit labels [B, 1] (one digit per clip by default)."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, config.model.num_classes, size=(batch, 1)).astype(np.int32)


def write_video(model: CausalDiT, config, path: str, *, num_frames: int, use_labels: bool,
                progress: bool = True, batch: int = 1) -> StreamStats:
  """Stream `num_frames` frames of the first sample in the batch into an mp4 at `path`."""
  from hybrid_video.video_io import Mp4Writer, to_uint8  # pylint: disable=g-import-not-at-top
  num_frames = check_num_frames(num_frames)
  frame_hw = video_frame_hw(config)
  sampler = StreamingSampler(model, config.sampler, batch=batch, frame_hw=frame_hw)
  cond = jnp.asarray(sample_labels(config, batch, config.sampler.seed)) if use_labels else None
  writer = Mp4Writer(path, fps=config.video_fps, upscale=config.video_upscale) \
      if jax.process_index() == 0 else None
  try:
    stats = sampler.stream(num_frames, cond, seed=config.sampler.seed, progress=progress,
                           on_frames=(lambda f: writer.write(to_uint8(f[0]))) if writer else None)
  finally:
    if writer is not None:
      writer.close()
  if cond is not None:
    stats.labels = np.asarray(cond).tolist()
  return stats


def video_frame_hw(config) -> tuple[int, int]:
  """Frame size the model generates: the training data's frame size."""
  if config.data.source == "moving_digits":
    from data import moving_digits  # pylint: disable=g-import-not-at-top
    c = moving_digits.get_config(config.data.config)
    return c.canvas_size, c.canvas_size
  return tuple(config.data.frame_size)


def report(path: str, stats: StreamStats, clip_frames: int | None = None):
  longer = f" ({stats.num_frames / clip_frames:.0f}x the training clips)" if clip_frames else ""
  print(f"video: {path}\n  {stats.num_frames} frames{longer}, {stats.num_chunks} chunks, "
        f"{stats.num_frames / max(stats.wall_seconds, 1e-9):.1f} frames/s, "
        f"carry {stats.carry_bytes[-1]} bytes, {stats.compiles} compile(s)")
  if stats.labels:
    print(f"  conditioned on digit label {stats.labels[0][0]} (sampler.seed picks it)")


def sample_main(config, workdir: str, *, num_frames: int | None = None,
                checkpoint_step: int | None = None, progress: bool = True) -> StreamStats:
  """--mode=sample: restore (EMA) parameters from the workdir and stream a video to mp4."""
  from hybrid_video.restore import load_model  # pylint: disable=g-import-not-at-top
  num_frames = check_num_frames(config.sampler.num_frames if num_frames is None else num_frames)
  # The checkpoint's own config defines the model (shapes and ablation switches).
  model, config, step = load_model(config, workdir, checkpoint_step)
  path = os.path.join(workdir, "samples", f"sample_step_{step:07d}_{num_frames}f.mp4")
  stats = write_video(model, config, path, num_frames=num_frames,
                      use_labels=config.model.cond == "labels", progress=progress)
  report(path, stats)
  return stats
