"""Conversion's quick check: PSNR on test clips, teacher vs student, continuing the same true
prefix with the same noise (the long-horizon study is --mode=eval)."""

from __future__ import annotations

import numpy as np

from data import moving_digits, pipeline
from hybrid_video import inputs as inputs_lib
from hybrid_video.errors import UserError
from hybrid_video.nn.model import CausalDiT
from hybrid_video.streaming import ChunkRunner, continue_clips
from hybrid_video.video_metrics import clip_psnr


def eval_clips(config, num_clips: int, num_frames: int | None):
  """(video float [B, T, H, W, C] in [-1, 1], labels [B, M] or None) from the test split.
  Moving-digits clips are regenerated to `num_frames` from their stored dynamics."""
  source = inputs_lib.make_split_source(config, "test")
  num_clips = min(int(num_clips), len(source))
  videos, labels = [], []
  for i in range(num_clips):
    ex = source[i]
    video = np.asarray(ex["video"])
    if config.data.source == "moving_digits" and num_frames:
      video = moving_digits.regenerate_clip(ex, num_frames, config.data.config)[0]
    videos.append(video)
    if "labels" in ex:
      labels.append(np.asarray(ex["labels"]))
  batch = pipeline.to_model_inputs({"video": np.stack(videos)})
  return batch["video"], (np.stack(labels).astype(np.int32) if labels else None)


def _psnr(a, b) -> float:
  """Mean over clips of the per-clip PSNR of videos in [-1, 1], on the [0, 1] scale."""
  return float(np.mean(clip_psnr((np.asarray(a) + 1.0) / 2.0, (np.asarray(b) + 1.0) / 2.0)))


def evaluate(models: dict[str, CausalDiT], config, ecfg) -> dict:
  """PSNR on test clips: each model continues the same ground-truth prefix with the same noise.

  Returns the mean over clips of the per-clip PSNR (all generated frames) of each model against
  the ground truth (also per generated chunk) and of every pair of models. For scale: the first
  model sampled with other noise (how far apart two samples of one model are) and holding the
  last context frame (a trivial predictor).
  """
  f = next(iter(models.values())).frames_per_chunk
  video, labels = eval_clips(config, ecfg.num_clips, ecfg.num_frames)
  context_chunks = int(ecfg.context_frames) // f
  if not 1 <= context_chunks < video.shape[1] // f:
    raise UserError(f"convert.eval.context_frames={ecfg.context_frames} must leave at least one "
                    f"chunk to generate in {video.shape[1]} frames (F={f})")
  truth = video[:, context_chunks * f:]
  seed = int(ecfg.seed)
  gen, first = {}, next(iter(models))
  for name, m in models.items():  # the first model also samples with other noise: the spread
    runner = ChunkRunner(m, config.sampler, batch=video.shape[0], frame_hw=video.shape[2:4])
    for s in ((seed, seed + 1) if name == first else (seed,)):
      out = continue_clips(runner, video, labels, context_frames=context_chunks * f,
                           num_frames=truth.shape[1], seed=s)
      gen[name if s == seed else f"{name}_other_noise"] = out
  gen["last_frame"] = np.repeat(video[:, context_chunks * f - 1:context_chunks * f],
                                truth.shape[1], axis=1)  # baseline: hold the last context frame
  out = {"num_clips": int(video.shape[0]), "context_frames": context_chunks * f,
         "generated_frames": int(truth.shape[1])}
  for name, g in gen.items():
    out[f"psnr_{name}_vs_truth"] = _psnr(g, truth)
    out[f"psnr_{name}_vs_truth_per_chunk"] = [
        _psnr(g[:, i:i + f], truth[:, i:i + f]) for i in range(0, g.shape[1], f)]
  names = [n for n in gen if n != "last_frame"]
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      out[f"psnr_{b}_vs_{a}"] = _psnr(gen[b], gen[a])
  return out
