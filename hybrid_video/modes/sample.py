"""--mode=sample: restore a checkpoint's EMA parameters and stream a video to mp4; the stream
survives being killed, and a saved chunk can start a new stream (a fork).

  python main.py --mode=sample --workdir=DIR [--config.sampler.num_frames=N]
                 [--config.train.resume_step=STEP]   # which checkpoint (default: latest)
                 [--config.sampler.checkpoint_every=16] [--config.sampler.output=NAME]
  # killed? rerun the same command: it continues from the last saved chunk
  python main.py --mode=sample --workdir=DIR --config.sampler.fork_from=NAME \
                 --config.sampler.fork_chunk=K --config.sampler.seed=1   # a fork

Files, next to the video <workdir>/samples/<name>.mp4 (written, whole, when the stream ends):
  <name>.stream/checkpoints/<chunk>/   stream checkpoints (hybrid_video/stream_state.py)
  <name>.stream/segments/<a>-<b>.mp4   the frames of chunks [a, b) (hybrid_video/video_segments.py)
A segment ends at every stream checkpoint, so a resumed stream drops the segments past its
checkpoint and writes them again: nothing is duplicated, and the joined video is the same,
frame for frame, as an uninterrupted run's. A fork copies its parent's segments up to the fork
chunk (the prefix is reused, not regenerated) and its carry, and continues with its own seed.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from hybrid_video import inputs as inputs_lib
from hybrid_video import sharding as sharding_lib
from hybrid_video import stream_state
from hybrid_video import streaming
from hybrid_video import video_segments
from hybrid_video.errors import UserError
from hybrid_video.modes.sample_text import sample_text_main
from hybrid_video.nn.model import carry_bytes
from hybrid_video.restore import load_model
from hybrid_video.video_io import read_video, to_uint8

BATCH = 1  # the video holds the first sample of the batch


@dataclass
class Start:
  """Where a stream (re)starts: the carry after `chunk` chunks, its key (None: from the
  seed) and labels."""
  carry: dict
  key: jax.Array | None
  labels: list | None
  chunk: int
  how: str  # "new", "resumed" or "forked", for the report


def _options(scfg) -> tuple[int, int]:
  every, keep = scfg.checkpoint_every, scfg.keep_stream_checkpoints
  for name, value in (("checkpoint_every", every), ("keep_stream_checkpoints", keep)):
    if not isinstance(value, int) or value < 0:
      raise UserError(f"sampler.{name}={value!r} must be an integer >= 0")
  for name in ("resume_chunk", "fork_chunk"):
    value = scfg[name]
    if value is not None and (not isinstance(value, int) or value < 0):
      raise UserError(f"sampler.{name}={value!r} must be an integer >= 0")
  if scfg.output is not None and (not scfg.output or os.sep in scfg.output):
    raise UserError(f"sampler.output={scfg.output!r} must be a file name (no folders)")
  return every, keep


def parent_stream_dir(fork_from: str, samples: str) -> str:
  """The .stream folder of a fork's parent: a name in `samples`, or a .mp4 / .stream path."""
  if fork_from.endswith(".mp4"):
    path = fork_from[:-len(".mp4")] + ".stream"
  elif fork_from.rstrip("/").endswith(".stream"):
    path = fork_from.rstrip("/")
  else:
    path = os.path.join(samples, fork_from + ".stream")
  if not os.path.isdir(os.path.join(path, "checkpoints")):
    raise UserError(f"sampler.fork_from={fork_from!r}: no stream checkpoints in {path}; fork "
                    "from a stream sampled with sampler.checkpoint_every > 0")
  return os.path.abspath(path)


def _restore(ckpt, runner, chunk: int, meta: dict):
  abstract = stream_state.abstract_carry(runner.model, runner.batch, runner.frame_hw,
                                         int(meta["capacity"]), runner.mesh, runner.rules)
  return ckpt.restore(chunk, abstract)


def _resume(ckpt, runner, fp, scfg) -> Start:
  chunks = ckpt.chunks()
  chunk = chunks[-1] if scfg.resume_chunk is None else scfg.resume_chunk
  if chunk not in chunks:
    raise UserError(f"sampler.resume_chunk={chunk}: no stream checkpoint at that chunk in "
                    f"{ckpt.directory}; saved chunks: {chunks}")
  meta = ckpt.check(chunk, fp, hint=" Rerun with the stream's config, or choose another "
                    "sampler.output for a new stream.")
  carry, key = _restore(ckpt, runner, chunk, meta)
  ckpt.discard_after(chunk)
  return Start(carry, key, meta["labels"], chunk, "resumed")


def _fork(parent_dir: str, chunk: int | None, runner, fp, scfg, segments_dir: str) -> Start:
  parent = stream_state.StreamCheckpointer(parent_dir, read_only=True)
  try:
    chunks = parent.chunks()
    chunk = chunks[-1] if chunk is None and chunks else chunk
    if chunk not in chunks:
      raise UserError(f"sampler.fork_chunk={chunk}: the parent stream {parent_dir} has saved "
                      f"chunks {chunks}")
    meta = parent.check(chunk, fp, ignore=stream_state.FORK_FREE,
                        hint=" A fork keeps its parent's model and sampler; only the seed, "
                        "num_frames and output may change.")
    if meta["fingerprint"]["sampler.seed"] == scfg.seed:
      raise UserError(f"sampler.seed={scfg.seed} is the parent's seed: the fork would repeat "
                      "its parent; choose another seed")
    f = runner.model.frames_per_chunk
    if meta["frames"] < chunk * f:
      raise UserError(f"sampler.fork_chunk={chunk}: the parent's chunk {chunk - 1} was cut to "
                      f"its num_frames={meta['frames']}; fork from an earlier chunk")
    carry, _ = _restore(parent, runner, chunk, meta)
  finally:
    parent.close()
  video_segments.copy_prefix(os.path.join(parent_dir, "segments"), segments_dir, chunk)
  return Start(carry, None, meta["labels"], chunk, f"forked from {parent_dir} at chunk {chunk}")


def _meta(fp, chunk: int, frames: int, start: Start, carry) -> dict:
  return {"fingerprint": fp, "chunk": chunk, "frames": frames, "labels": start.labels,
          "capacity": stream_state.capacity_of(carry), "saved_at": time.time()}


def sample_main(config, workdir: str, *, overrides=None) -> streaming.StreamStats:
  """Stream config.sampler.num_frames frames from the workdir's checkpoint, resuming or forking
  a saved stream as the config says (see the module docstring)."""
  if "t2v" in config:  # a text-to-video model (configs/wan.py)
    return sample_text_main(config, workdir, overrides=overrides)
  scfg = config.sampler
  num_frames = streaming.check_num_frames(scfg.num_frames)
  every, keep = _options(scfg)
  # The checkpoint's own config defines the model (shapes and ablation switches).
  model, config, step = load_model(config, workdir, config.train.resume_step,
                                   cli_overrides=overrides)
  scfg = config.sampler
  mesh = sharding_lib.make_mesh(config.mesh) if scfg.use_mesh else None
  rules = sharding_lib.rules_from_config(config.mesh) if scfg.use_mesh else None
  frame_hw = inputs_lib.frame_hw(config)
  runner = streaming.StreamingSampler(model, scfg, batch=BATCH, frame_hw=frame_hw, mesh=mesh,
                                      rules=rules)
  samples = os.path.join(workdir, "samples")
  parent_dir, fork = None, None
  if scfg.fork_from is not None:
    parent_dir = parent_stream_dir(scfg.fork_from, samples)
    fork_chunk = scfg.fork_chunk
    if fork_chunk is None:
      parent = stream_state.StreamCheckpointer(parent_dir, read_only=True)
      fork_chunk = parent.latest()
      parent.close()
    fork = {"from": parent_dir, "chunk": fork_chunk}
    name = scfg.output or (f"{os.path.basename(parent_dir)[:-len('.stream')]}"
                           f"_fork{fork_chunk}_seed{scfg.seed}")
  else:
    # Seed 0 keeps the plain name (streams from before the suffix resume); another seed gets its
    # own stream instead of a refusal to resume seed 0's.
    name = scfg.output or (f"sample_step_{step:07d}_{num_frames}f"
                           + (f"_seed{scfg.seed}" if scfg.seed else ""))
  path = os.path.join(samples, name + ".mp4")
  stream_dir = os.path.join(samples, name + ".stream")
  segments_dir = os.path.join(stream_dir, "segments")
  fp = stream_state.fingerprint(config, model_step=step,
                                params=stream_state.params_digest(runner.state), batch=BATCH,
                                frame_hw=frame_hw, num_frames=num_frames, fork=fork)
  ckpt = stream_state.StreamCheckpointer(stream_dir, keep=keep)
  try:
    if ckpt.chunks():
      start = _resume(ckpt, runner, fp, scfg)
    elif fork is not None:
      start = _fork(parent_dir, fork["chunk"], runner, fp, scfg, segments_dir)
    else:
      labels = (streaming.sample_labels(config.model.num_classes, BATCH, scfg.seed).tolist()
                if config.model.cond == "labels" else None)
      carry = runner.init_carry()
      if mesh is None:  # committed like the step's outputs (and a restored carry): one compile
        carry = jax.device_put(carry, jax.local_devices()[0])
      start = Start(carry, None, labels, 0, "new")
    stats = _stream(runner, ckpt, start, fp, path=path, segments_dir=segments_dir,
                    num_frames=num_frames, every=every, config=config)
  finally:
    ckpt.close()
  streaming.report(path, stats)
  if config.data.source == "moving_digits" and jax.process_index() == 0:
    # The whole video (a resumed stream's earlier chunks too), read back from the mp4.
    up = int(config.video_upscale)
    frames = read_video(path)[:, ::up, ::up, 0].astype(np.float32) / 255.0
    label = stats.labels[0][0] if stats.labels else None
    stats.digits = streaming.report_digits(frames, label, config,
                                           path[:-len(".mp4")] + "_digits.json",
                                           source=" (read back from the mp4)")
  print(f"  stream {start.how}{f' at chunk {start.chunk}' if start.how == 'resumed' else ''}; "
        f"checkpoints and segments in {stream_dir}")
  return stats


def _stream(runner, ckpt, start: Start, fp, *, path: str, segments_dir: str, num_frames: int,
            every: int, config) -> streaming.StreamStats:
  """Generate chunks start.chunk.. into segments, saving a stream checkpoint every `every`
  chunks and at the end; then join the segments into `path`."""
  f = runner.model.frames_per_chunk
  num_chunks = math.ceil(num_frames / f)
  if start.chunk > num_chunks:
    raise UserError(f"sampler.num_frames={num_frames} ends before the saved chunk "
                    f"{start.chunk}; ask for more than {start.chunk * f} frames")
  main = jax.process_index() == 0
  if main:
    video_segments.prune(segments_dir, start.chunk)
    video_segments.covering(segments_dir, start.chunk)  # the prefix must be whole
  key, context = runner.prepare(config.sampler.seed, None if start.labels is None else
                                jnp.asarray(start.labels, jnp.int32))
  key = key if start.key is None else start.key  # a resume continues with the saved key
  carry = start.carry
  if every and start.how.startswith("forked"):  # a rerun of the fork command resumes here
    ckpt.save(start.chunk, carry, key, _meta(fp, start.chunk, start.chunk * f, start, carry))
  stats = streaming.StreamStats(num_frames=num_frames, num_chunks=num_chunks, labels=start.labels,
                                carry_bytes=[carry_bytes(carry)])
  saved = ckpt.latest()
  done_frames = min(start.chunk * f, num_frames)
  bar = tqdm(total=num_frames, initial=done_frames, unit="frame", desc="sampling",
             disable=not config.progress)
  writer, save_seconds = None, []
  t_start = t_chunk = time.perf_counter()
  for n, carry, frames in runner.chunks(carry, key, context, num_chunks):
    frames = np.asarray(frames)[0, :num_frames - n * f]  # blocks until the chunk is done
    stats.chunk_seconds.append(time.perf_counter() - t_chunk)
    stats.carry_bytes.append(carry_bytes(carry))
    if main:
      writer = writer or video_segments.SegmentWriter(
          segments_dir, n, fps=config.video_fps, upscale=config.video_upscale)
      writer.write(to_uint8(frames))
    done = n + 1
    if done == num_chunks or (every and done % every == 0):
      if writer is not None:
        writer.close(done)  # the segment is whole before the checkpoint that covers it
        writer = None
      if every:
        t0 = time.perf_counter()
        ckpt.save(done, carry, key,
                  _meta(fp, done, min(done * f, num_frames), start, carry))
        save_seconds.append(time.perf_counter() - t0)
        saved = done
    bar.update(frames.shape[0])
    elapsed = time.perf_counter() - t_start
    bar.set_postfix(fps=f"{(bar.n - done_frames) / max(elapsed, 1e-9):.1f}",
                    saved=f"chunk {saved}" if saved is not None else "none")
    t_chunk = time.perf_counter()
  bar.close()
  ckpt.wait()
  if main:
    parts = video_segments.covering(segments_dir, num_chunks)
    joined = video_segments.join([p for _, _, p in parts], path)
    if joined != num_frames:
      raise UserError(f"the segments in {segments_dir} hold {joined} frames, not "
                      f"num_frames={num_frames}")
  stats.wall_seconds = time.perf_counter() - t_start
  stats.compiles = runner.compiles
  if save_seconds:
    print(f"stream checkpoints: {len(save_seconds)} saved, "
          f"{1e3 * np.mean(save_seconds):.1f} ms each (blocking part), last at chunk {saved}")
  return stats

