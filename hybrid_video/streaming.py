"""The one streaming core: per-chunk jitted functions driven from the host, and the video loop.

`ChunkRunner` holds, for one model, sampler config and chunk shape:

  generate(carry, key, context) -> (carry, frames)   # the sampler's per-chunk step
                                                     # (hybrid_video.diffusion.sample_chunk_fn)
  feed(carry, frames, context) -> carry              # context pass at t = 0 on a given clean
                                                     # chunk: writes K/V and S_n (teacher forcing)
  continue_from(frames, num_chunks, key, context)    # feed whole chunks, then generate

The carry is donated to both. Unbounded softmax caches double when full (`reserve`), so each
capacity compiles once; `capacities(num_chunks)` lists them so callers can warm them up.
`StreamingSampler` adds the whole-video loop and `write_video` streams it into an mp4; the
benchmark drives chunks itself to interleave policies, the evaluations feed true frames first.

With a mesh the parameters and carry are sharded (GDN states over heads, K/V caches over heads
and context) and generate is jitted with explicit in/out shardings per capacity.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from data import digit_metrics, moving_digits
from hybrid_video import sharding as sharding_lib
from hybrid_video.diffusion import sample_chunk_fn
from hybrid_video.errors import UserError
from hybrid_video.nn.model import CausalDiT, Carry, carry_bytes, grow_carry
from hybrid_video.video_io import Mp4Writer, to_uint8


class ChunkRunner:
  """Jitted per-chunk generate / feed functions for one model, sampler config and chunk shape."""

  def __init__(self, model: CausalDiT, scfg, *, batch: int, frame_hw, mesh=None, rules=None):
    """mesh/rules: shard parameters and carry and jit with explicit shardings; None runs on
    the default device."""
    self.model = model
    self.scfg = scfg
    self.mesh = mesh
    self.rules = rules if rules is not None else dict(sharding_lib.DEFAULT_RULES)
    self.batch = int(batch)
    self.frame_hw = tuple(int(s) for s in frame_hw)
    model.chunk_grid(self.frame_hw)  # validates the frame size
    self.chunk_shape = (self.batch, model.frames_per_chunk, *self.frame_hw, model.out_channels)
    self.graphdef, self.state = nnx.split(model)
    if mesh is not None:
      self.state = sharding_lib.put(self.state, sharding_lib.named(
          mesh, sharding_lib.param_specs(self.state, self.rules, mesh)))
    devices = set().union(*(x.devices() for x in jax.tree.leaves(self.state)))
    self._device = next(iter(devices)) if len(devices) == 1 else None
    self.generate_traces: list = []
    self.feed_traces: list = []
    self._chunk_fn = sample_chunk_fn(self.graphdef, scfg, self.chunk_shape, self.generate_traces)
    self._generate_jits: dict[int, Callable] = {}  # one per cache capacity
    self._steps: dict[int, Callable] = {}          # the same, under the activation sharding
    self._feed = jax.jit(self._feed_fn, donate_argnums=(1,))
    self._embed = jax.jit(lambda state, cond: nnx.merge(self.graphdef, state).embed_condition(
        cond, self.batch))

  def _feed_fn(self, state, carry, frames, context):
    self.feed_traces.append(1)  # runs once per trace: counts compiles
    model = nnx.merge(self.graphdef, state)
    t = jnp.zeros((frames.shape[0],), jnp.float32)
    _, carry = model.step(frames.astype(jnp.float32), t, context, carry, write=True)
    return carry

  @property
  def compiles(self) -> int:
    """Executables built so far for generate (one per cache capacity)."""
    return len(self.generate_traces)

  @property
  def grows(self) -> bool:
    """True when the carry grows: softmax layers with an unbounded cache."""
    return bool(self.model.softmax_layers) and not self.model.bounded_cache

  def initial_capacity(self) -> int:
    return self.model.cache_capacity(int(self.scfg.cache_chunks))

  def capacities(self, num_chunks: int) -> list[int]:
    """Cache capacities (chunks) a stream of `num_chunks` chunks goes through, in order."""
    cap = self.initial_capacity()
    caps = [cap]
    while self.grows and cap < num_chunks:
      cap *= 2
      caps.append(cap)
    return caps

  # -- placement ---------------------------------------------------------------------------------

  def _carry_shardings(self, carry):
    return sharding_lib.named(self.mesh, sharding_lib.carry_specs(carry, self.rules, self.mesh))

  def _place(self, carry):
    if self.mesh is None:
      # On the parameters' device, committed like them: an uncommitted first carry next to
      # committed (restored) parameters would compile the step a second time at chunk 1.
      return carry if self._device is None else jax.device_put(carry, self._device)
    return sharding_lib.put(carry, self._carry_shardings(carry))

  def init_carry(self, capacity: int | None = None) -> Carry:
    cap = self.initial_capacity() if capacity is None else capacity
    return self._place(self.model.init_carry(self.batch, self.frame_hw, cap))

  def reserve(self, carry: Carry, chunk_index: int) -> Carry:
    """The carry, grown by doubling until chunk `chunk_index` has a cache slot."""
    if not self.grows:
      return carry
    capacity = carry["slot_chunk"].shape[0]
    target = capacity
    while chunk_index >= target:
      target *= 2
    return self._place(grow_carry(carry, target)) if target > capacity else carry

  def embed(self, cond) -> jax.Array:
    """Conditioning tokens [B, M, dim] for `cond` (labels [B, M], embeddings or None)."""
    if self.mesh is not None and cond is not None:
      cond = sharding_lib.put(cond, NamedSharding(self.mesh, P()))
    return self._embed(self.state, cond)

  def prepare(self, seed: int, cond=None):
    """(key, context) for a stream, placed on the mesh (replicated) when there is one."""
    key = jax.random.key(seed)
    if self.mesh is not None:
      key = sharding_lib.put(key, NamedSharding(self.mesh, P()))
    return key, self.embed(cond)

  # -- the jitted steps --------------------------------------------------------------------------

  def generate_jit(self, carry) -> Callable:
    """The plain jitted step for this carry's capacity (callers that trace or lower it, e.g.
    the benchmark's analyses, enter `sharding.activation_sharding` themselves)."""
    capacity = carry["slot_chunk"].shape[0]
    if capacity not in self._generate_jits:
      if self.mesh is None:
        jitted = jax.jit(self._chunk_fn, donate_argnums=(1,))
      else:
        carry_sh = self._carry_shardings(carry)
        state_sh = jax.tree.map(lambda x: x.sharding, self.state)
        frames_sh = NamedSharding(self.mesh, sharding_lib.batch_spec(
            self.rules, self.mesh, self.chunk_shape))
        jitted = jax.jit(self._chunk_fn, donate_argnums=(1,),
                         in_shardings=(state_sh, carry_sh, None, None),
                         out_shardings=(carry_sh, frames_sh))
      self._generate_jits[capacity] = jitted
    return self._generate_jits[capacity]

  def step_fn(self, carry) -> Callable:
    """The jitted `(state, carry, key, context) -> (carry, frames)` for this carry's capacity
    (built once per capacity: this is the per-chunk hot path)."""
    capacity = carry["slot_chunk"].shape[0]
    if capacity not in self._steps:
      jitted, mesh, rules = self.generate_jit(carry), self.mesh, self.rules

      def step(state, carry, key, context):
        with sharding_lib.activation_sharding(mesh, rules):
          return jitted(state, carry, key, context)

      self._steps[capacity] = step
    return self._steps[capacity]

  def generate(self, carry: Carry, key, context):
    """Denoise one new chunk from noise, then write it (context pass). -> (carry, frames)."""
    return self.step_fn(carry)(self.state, carry, key, context)

  def feed(self, carry: Carry, frames, context) -> Carry:
    """Write a given clean chunk frames [B, F, H, W, C] in [-1, 1] (t = 0 context pass)."""
    with sharding_lib.activation_sharding(self.mesh, self.rules):
      return self._feed(self.state, carry, jnp.asarray(frames, jnp.float32), context)

  def continue_from(self, frames, num_chunks: int, key, context, *,
                    on_chunk: Callable[[], None] | None = None) -> np.ndarray:
    """Feed `frames` [B, k*F, H, W, C] in [-1, 1] (whole chunks) by context passes, then
    generate `num_chunks` chunks with `key`. Returns float [B, num_chunks*F, H, W, C] in [-1, 1].
    on_chunk is called after every fed or generated chunk (progress bars)."""
    f = self.model.frames_per_chunk
    frames = np.asarray(frames, np.float32)
    if frames.shape[1] % f:
      raise ValueError(f"{frames.shape[1]} context frames are not whole chunks of {f}")
    fed = frames.shape[1] // f
    carry, out = self.init_carry(), []
    for n in range(fed):
      carry = self.feed(self.reserve(carry, n), frames[:, n * f:(n + 1) * f], context)
      if on_chunk is not None:
        on_chunk()
    for j in range(num_chunks):
      carry, x0 = self.generate(self.reserve(carry, fed + j), key, context)
      out.append(sharding_lib.to_host(x0))
      if on_chunk is not None:
        on_chunk()
    return np.concatenate(out, axis=1)


# -- whole videos ------------------------------------------------------------------------------


@dataclass
class StreamStats:
  num_frames: int = 0
  num_chunks: int = 0
  compiles: int = 0
  carry_bytes: list[int] = field(default_factory=list)   # after each chunk
  chunk_seconds: list[float] = field(default_factory=list)
  wall_seconds: float = 0.0
  labels: list | None = None                             # conditioning labels, if any
  digits: dict | None = None                             # Moving-Digits figures (report_digits)


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
      frames = sharding_lib.to_host(frames)[:, :num_frames - n * f]  # blocks until it is done
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

  def chunks(self, carry: Carry, key, context,
             num_chunks: int) -> Iterator[tuple[int, Carry, jax.Array]]:
    """Drive a stream from `carry` (fresh, or restored at any chunk index) up to `num_chunks`
    chunks: yields (n, carry after chunk n, frames [B, F, H, W, C] of chunk n, on device).

    The yielded carry is donated to the next step: save or copy it before advancing. Resuming
    from a carry saved after chunk n with the same key continues the stream bit for bit (the
    noise of chunk n is fold_in(key, carry["chunk"])).
    """
    for n in range(int(carry["chunk"]), num_chunks):
      carry, frames = self.generate(self.reserve(carry, n), key, context)
      yield n, carry, frames


def sample_labels(num_classes: int, batch: int, seed: int) -> np.ndarray:
  """Random digit labels [B, 1] (one digit per clip by default)."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, num_classes, size=(batch, 1)).astype(np.int32)


def write_video(model: CausalDiT, config, path: str, *, frame_hw, num_frames: int,
                use_labels: bool, progress: bool = True, batch: int = 1, mesh=None,
                rules=None, on_frames: Callable[[np.ndarray], None] | None = None
                ) -> StreamStats:
  """Stream `num_frames` frames of the first sample in the batch into an mp4 at `path`, written
  chunk by chunk as they arrive (by process 0). frame_hw: the frame size the model generates
  (`inputs.frame_hw(config)`). mesh/rules: see ChunkRunner (needed when the parameters span
  several processes). on_frames also gets each chunk's frames of that sample, [T, H, W, C] in
  [-1, 1] (process 0)."""
  num_frames = check_num_frames(num_frames)
  sampler = StreamingSampler(model, config.sampler, batch=batch, frame_hw=frame_hw, mesh=mesh,
                             rules=rules)
  cond = (jnp.asarray(sample_labels(config.model.num_classes, batch, config.sampler.seed))
          if use_labels else None)
  writer = Mp4Writer(path, fps=config.video_fps, upscale=config.video_upscale) \
      if jax.process_index() == 0 else None
  def write(frames):
    writer.write(to_uint8(frames[0]))
    if on_frames is not None:
      on_frames(np.asarray(frames[0]))

  try:
    stats = sampler.stream(num_frames, cond, seed=config.sampler.seed, progress=progress,
                           on_frames=write if writer else None)
  finally:
    if writer is not None:
      writer.close()
  if cond is not None:
    stats.labels = np.asarray(cond).tolist()
  return stats


def report(path: str, stats: StreamStats, clip_frames: int | None = None):
  """Print a video's summary line (frames, chunks, speed, carry, compiles, label)."""
  longer = f" ({stats.num_frames / clip_frames:.0f}x the training clips)" if clip_frames else ""
  print(f"video: {path}\n  {stats.num_frames} frames{longer}, {stats.num_chunks} chunks, "
        f"{stats.num_frames / max(stats.wall_seconds, 1e-9):.1f} frames/s, "
        f"carry {stats.carry_bytes[-1]} bytes, {stats.compiles} compile(s)")
  if stats.labels:
    print(f"  conditioned on digit label {stats.labels[0][0]} (sampler.seed picks it)")


def report_digits(frames01: np.ndarray, label: int | None, config, json_path: str,
                  source: str = "") -> dict:
  """The three digit figures of a Moving-Digits video (data/digit_metrics.py) on its frames
  [T, H, W] in [0, 1] conditioned on `label`: the label recognised, one digit on screen, a
  steady centre (<= 3 px per frame); printed, and written to `json_path`."""
  dcfg = moving_digits.get_config(config.data.config)
  classifier = digit_metrics.digit_classifier(dcfg.digit_size, dcfg.interpolation)
  r = digit_metrics.video_digit_report(frames01, label, classifier)
  with open(json_path, "w") as f:
    json.dump(r, f, indent=1)
  targets = {"label_rate": 0.8, "single_digit_rate": 0.95, "steady_rate": 0.9}
  mark = lambda key: "ok" if (r[key] or 0) >= targets[key] else f"below {targets[key]:.0%}"
  label_part = (f"label {label} recognised in {r['label_rate']:.0%} of frames "
                f"({mark('label_rate')}), " if label is not None else "")
  print(f"  digits{source}: {label_part}one digit in {r['single_digit_rate']:.0%} "
        f"({mark('single_digit_rate')}), centre moves <= 3 px in {r['steady_rate']:.0%} of "
        f"frame pairs ({mark('steady_rate')})")
  return {k: r[k] for k in ("label", "label_rate", "single_digit_rate", "steady_rate")}


def continue_clips(runner: ChunkRunner, videos: np.ndarray, labels: np.ndarray | None, *,
                   context_frames: int, num_frames: int, seed: int,
                   on_chunk: Callable[[], None] | None = None) -> np.ndarray:
  """The one clip continuation: feed the first `context_frames` true frames of each clip by
  context passes, then generate `num_frames` more.

  videos float [V, T, H, W, C] in [-1, 1]; labels int [V, M] or None. Clips go through in batches
  of runner.batch (the last padded with repeats); the batch that starts at clip s samples with
  key(seed + s). Returns float [V, num_frames, H, W, C] in [-1, 1].
  """
  f = runner.model.frames_per_chunk
  if context_frames <= 0 or context_frames % f:
    raise UserError(f"context_frames={context_frames} must be a positive multiple of the "
                    f"model's frames_per_chunk={f}")
  gen_chunks = math.ceil(num_frames / f)
  b, num_videos = runner.batch, videos.shape[0]
  out = np.zeros((num_videos, gen_chunks * f, *videos.shape[2:4], runner.chunk_shape[-1]),
                 np.float32)
  for start in range(0, num_videos, b):
    idx = np.arange(start, start + b) % num_videos  # the last batch is padded with repeats
    cond = None if labels is None else jnp.asarray(labels[idx], jnp.int32)
    gen = runner.continue_from(np.asarray(videos[idx][:, :context_frames], np.float32),
                               gen_chunks, jax.random.key(seed + start), runner.embed(cond),
                               on_chunk=on_chunk)
    keep = min(b, num_videos - start)
    out[start:start + keep] = gen[:keep]
  return out[:, :num_frames]
