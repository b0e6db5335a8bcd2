"""The streaming sampler's host loop: one jitted per-chunk step with a donated carry.

for each chunk n: denoise (reads only) -> emit -> context pass at t = 0 (writes K/V and S_n).
With every layer hybrid the carry has fixed shapes, so one executable serves every chunk.
Softmax layers with an unbounded cache grow it by doubling (one compile per doubling).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from hybrid_video.diffusion import sample_chunk_fn
from hybrid_video.model import CausalDiT, carry_bytes, grow_carry


@dataclass
class StreamStats:
  num_frames: int = 0
  num_chunks: int = 0
  compiles: int = 0
  carry_bytes: list[int] = field(default_factory=list)   # after each chunk
  chunk_seconds: list[float] = field(default_factory=list)
  wall_seconds: float = 0.0


def check_num_frames(num_frames) -> int:
  if not isinstance(num_frames, (int, np.integer)) or num_frames <= 0:
    raise ValueError(f"num_frames={num_frames!r} must be a positive integer")
  return int(num_frames)


class StreamingSampler:
  """Holds the compiled per-chunk step for one model, sampler config and chunk shape."""

  def __init__(self, model: CausalDiT, scfg, *, batch: int, frame_hw, channels: int | None = None):
    self.model = model
    self.scfg = scfg
    self.batch = int(batch)
    self.frame_hw = tuple(int(s) for s in frame_hw)
    model.chunk_grid(self.frame_hw)  # validates the frame size
    channels = model.out_channels if channels is None else channels
    self.chunk_shape = (self.batch, model.frames_per_chunk, *self.frame_hw, channels)
    self.graphdef, self.state = nnx.split(model)
    self._traces: list = []
    self._step = jax.jit(sample_chunk_fn(self.graphdef, scfg, self.chunk_shape, self._traces),
                         donate_argnums=(1,))
    self._embed = jax.jit(lambda state, cond: nnx.merge(self.graphdef, state).embed_condition(
        cond, self.batch))

  @property
  def compiles(self) -> int:
    return len(self._traces)

  def init_carry(self):
    return self.model.init_carry(self.batch, self.frame_hw, int(self.scfg.cache_chunks))

  def stream(self, num_frames: int, cond=None, *, seed: int = 0,
             on_frames: Callable[[np.ndarray], None] | None = None,
             progress: bool = True) -> StreamStats:
    """Generate `num_frames` frames chunk by chunk; on_frames gets float [B, F', H, W, C] each chunk."""
    num_frames = check_num_frames(num_frames)
    f = self.model.frames_per_chunk
    num_chunks = math.ceil(num_frames / f)
    key = jax.random.key(seed)
    context = self._embed(self.state, cond)
    carry = self.init_carry()
    stats = StreamStats(num_frames=num_frames, num_chunks=num_chunks)
    start = time.perf_counter()
    bar = tqdm(total=num_frames, unit="frame", disable=not progress, desc="sampling")
    for n in range(num_chunks):
      capacity = carry["slot_chunk"].shape[0]
      if self.model.softmax_layers and not self.model.bounded_cache and n >= capacity:
        carry = grow_carry(carry, 2 * capacity)
      t0 = time.perf_counter()
      carry, frames = self._step(self.state, carry, key, context)
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
