"""Config -> training batches. Batch k is a pure function of (seed, k), so a resumed run sees
exactly the batches an uninterrupted run would have seen.

Each process reads only its own slice of the records (per-process batch = global / processes).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterator

import jax
import numpy as np

from data import pipeline
from data.errors import DataError
from hybrid_video.errors import UserError


@dataclass
class TrainInputs:
  source: Any              # random-access source of raw examples
  batch_size: int          # global batch size
  seed: int
  use_labels: bool
  example_shape: tuple     # (T, H, W, C) of one clip

  def check_model(self, model) -> None:
    """Clear errors when clips and model disagree (channels, patch size, chunk size)."""
    model.check_video((1, *self.example_shape), what="training clips")

  def _dataset(self):
    import grain  # pylint: disable=g-import-not-at-top
    pc, pi = jax.process_count(), jax.process_index()
    if self.batch_size % pc:
      raise UserError(f"train.batch_size={self.batch_size} is not divisible by the "
                      f"{pc} processes")
    start, stop = pipeline.shard_range(len(self.source), pi, pc)
    per_process = self.batch_size // pc
    if stop - start < per_process:
      raise UserError(f"the {stop - start} training clips of this process are fewer than one "
                      f"batch of {per_process}")
    ds = grain.MapDataset.source(self.source)[start:stop]
    return ds.shuffle(seed=self.seed).repeat().batch(per_process, drop_remainder=True)

  def iterator(self, start_step: int = 0) -> Iterator[dict]:
    """Model-ready batches from `start_step` on: video float32 in [-1, 1], labels int32."""
    ds = self._dataset()
    keys = ("video", "labels") if self.use_labels else ("video",)
    for k in itertools.count(start_step):
      raw = ds[k]
      batch = pipeline.to_model_inputs({key: raw[key] for key in keys})
      yield {key: batch[key] for key in keys}


def _builder(config):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()  # our own progress bars are enough
  d = config.data
  if d.source == "moving_digits":
    from data import moving_digits  # pylint: disable=g-import-not-at-top
    return moving_digits.prepare(d.config, d.dir)
  if d.source == "video_folder":
    if not d.folder:
      raise UserError("data.source='video_folder' needs --config.data.folder=PATH")
    from data import video_folder  # pylint: disable=g-import-not-at-top
    h, w = d.frame_size
    return video_folder.prepare(d.folder, d.dir, num_frames=d.num_frames, height=h, width=w,
                                fps=d.fps, channels=d.channels)
  raise UserError(f"data.source={d.source!r} must be 'moving_digits' or 'video_folder'")


def make_train_inputs(config) -> TrainInputs:
  try:
    builder = _builder(config)
    source = pipeline.get_source(builder, "train")
  except DataError as e:
    raise UserError(str(e)) from None
  example = source[0]
  use_labels = config.model.cond == "labels"
  if use_labels and "labels" not in example:
    raise UserError(f"model.cond='labels' but data.source={config.data.source!r} has no labels;"
                    " use --config.model.cond=none")
  return TrainInputs(source=source, batch_size=int(config.train.batch_size),
                     seed=int(config.seed), use_labels=use_labels,
                     example_shape=tuple(np.asarray(example["video"]).shape))


def make_split_source(config, split: str):
  """Raw random-access source of a split (evaluation)."""
  try:
    return pipeline.get_source(_builder(config), split)
  except DataError as e:
    raise UserError(str(e)) from None
