"""--mode=train: train from scratch (the Trainer), write periodic samples, then stream the final
long video (the main job)."""

from __future__ import annotations

import os
import time

import jax
from absl import logging

from hybrid_video import inputs as inputs_lib
from hybrid_video import streaming
from hybrid_video.train import Trainer


def train_main(config, workdir: str, *, overrides=None) -> dict:
  """Train, sample every train.sample_every steps, then stream sampler.num_frames frames."""
  progress = bool(config.progress)
  os.makedirs(workdir, exist_ok=True)
  trainer = Trainer(config, workdir)
  labels = trainer.data.use_labels
  frame_hw = inputs_lib.frame_hw(config)
  # Several processes: the parameters span them, so the sampler shards like the trainer.
  sharded = ({"mesh": trainer.mesh, "rules": trainer.rules} if jax.process_count() > 1 else {})

  def on_sample(step):
    path = os.path.join(workdir, "samples", f"step_{step:07d}.mp4")
    streaming.write_video(trainer.model(ema=True), config, path, frame_hw=frame_hw,
                          num_frames=config.train.sample_frames, use_labels=labels,
                          progress=False, **sharded)

  t0 = time.perf_counter()
  summary = trainer.run(on_sample=on_sample, progress=progress)
  summary["train_seconds"] = time.perf_counter() - t0
  logging.info("trained to step %d, final loss %.5f (%.1f s)", summary["step"],
               summary["final_loss"], summary["train_seconds"])
  print(f"trained to step {summary['step']}  final loss {summary['final_loss']:.5f}  "
        f"({summary['train_seconds']:.0f} s)")
  if config.train.final_sample:
    path = os.path.join(workdir, "samples", f"final_step_{summary['step']:07d}.mp4")
    stats = streaming.write_video(trainer.model(ema=True), config, path, frame_hw=frame_hw,
                                  num_frames=config.sampler.num_frames, use_labels=labels,
                                  progress=progress, **sharded)
    summary["video"] = path
    summary["video_stats"] = stats
    streaming.report(path, stats, clip_frames=trainer.data.example_shape[0])
  trainer.checkpointer.close()
  return summary
