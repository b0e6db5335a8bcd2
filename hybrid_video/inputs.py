"""Config -> data: training batches, evaluation splits, and the frame size a data source gives.

Training batches: Batch k is a pure function of (seed, k), so a resumed run sees
exactly the batches an uninterrupted run would have seen.

Global batch k is the same for any number of processes; each process reads only its own slice
of it (per-process batch = global / processes).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any, Iterator

import jax
import numpy as np

from data import moving_digits, pipeline, video_folder
from data.errors import DataError
from hybrid_video.errors import UserError


@dataclass
class TrainInputs:
  source: Any              # random-access source of raw examples
  batch_size: int          # global batch size
  seed: int
  use_labels: bool
  example_shape: tuple     # (T, H, W, C) of one clip
  latents: bool = False    # records hold float32 VAE latents ('latents'), not uint8 'video'

  def check_model(self, model) -> None:
    """Clear errors when clips and model disagree (channels, patch size, chunk size)."""
    model.check_video((1, *self.example_shape), what="training clips")

  def _order(self):
    """Global batches of record indices: batch k is a pure function of (seed, k), the same for
    any number of processes."""
    import grain  # pylint: disable=g-import-not-at-top
    pc = jax.process_count()
    if self.batch_size % pc:
      raise UserError(f"train.batch_size={self.batch_size} is not divisible by the "
                      f"{pc} processes")
    if len(self.source) < self.batch_size:
      raise UserError(f"the {len(self.source)} training clips are fewer than one batch of "
                      f"{self.batch_size}")
    order = grain.MapDataset.range(len(self.source)).shuffle(seed=self.seed).repeat()
    return order.batch(self.batch_size, drop_remainder=True)

  def iterator(self, start_step: int = 0) -> Iterator[dict]:
    """This process's slice of global batch k, for k from `start_step` on: video float32 in
    [-1, 1], labels int32. Each process reads only its own records; the global batch does not
    depend on the number of processes."""
    order = self._order()
    per_process = self.batch_size // jax.process_count()
    mine = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    keys = ("video", "labels") if self.use_labels else ("video",)
    for k in itertools.count(start_step):
      records = [self.source[int(i)] for i in np.asarray(order[k])[mine]]
      if self.latents:  # already normalised latents: the model's input as stored
        yield {"video": np.stack([np.asarray(r["latents"], np.float32) for r in records])}
        continue
      raw = {key: np.stack([np.asarray(r[key]) for r in records]) for key in keys}
      batch = pipeline.to_model_inputs(raw)
      yield {key: batch[key] for key in keys}


def _builder(config):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()  # our own progress bars are enough
  d = config.data
  if d.source == "moving_digits":
    return moving_digits.prepare(d.config, d.dir)
  if d.source == "video_folder":
    if not d.folder:
      raise UserError("data.source='video_folder' needs --config.data.folder=PATH")
    h, w = d.frame_size
    return video_folder.prepare(d.folder, d.dir, num_frames=d.num_frames, height=h, width=w,
                                fps=d.fps, channels=d.channels)
  if d.source == "latent_clips":  # a dataset written by --mode=encode (data/latent_clips.py)
    if not d.get("latents"):
      raise UserError("data.source='latent_clips' needs --config.data.latents=DIR (the dataset "
                      "directory --mode=encode printed)")
    if not os.path.isdir(d.latents):
      raise UserError(f"--config.data.latents={d.latents} is not a directory")
    return d.latents
  raise UserError(f"data.source={d.source!r} must be 'moving_digits', 'video_folder' or "
                  "'latent_clips'")


def make_train_inputs(config) -> TrainInputs:
  try:
    builder = _builder(config)
    source = pipeline.get_source(builder, "train")
  except DataError as e:
    raise UserError(str(e)) from None
  example = source[0]
  latents = config.data.source == "latent_clips"
  if latents and "latents" not in example:
    raise UserError(f"{config.data.latents} is not a latent_clips dataset (its records have "
                    f"{sorted(example)})")
  use_labels = config.model.cond == "labels"
  if use_labels and "labels" not in example:
    raise UserError(f"model.cond='labels' but data.source={config.data.source!r} has no labels;"
                    " use --config.model.cond=none")
  shape = tuple(np.asarray(example["latents" if latents else "video"]).shape)
  if config.data.source != "moving_digits":
    want = (int(config.data.num_frames), *frame_hw(config))
    if shape[:3] != want:  # the sampler generates frame_hw(config): train on that size
      raise UserError(f"the {config.data.source} clips are {shape[:3]} (frames, height, width) "
                      f"but the config says data.num_frames={want[0]}, "
                      f"data.frame_size={want[1:]}")
  return TrainInputs(source=source, batch_size=int(config.train.batch_size),
                     seed=int(config.seed), use_labels=use_labels, example_shape=shape,
                     latents=latents)


def make_split_source(config, split: str):
  """Raw random-access source of a split (evaluation)."""
  try:
    return pipeline.get_source(_builder(config), split)
  except DataError as e:
    raise UserError(str(e)) from None


def frame_hw(config) -> tuple[int, int]:
  """Frame size (H, W) the model generates: the training data's frame size."""
  if config.data.source == "moving_digits":
    c = moving_digits.get_config(config.data.config)
    return c.canvas_size, c.canvas_size
  return tuple(int(s) for s in config.data.frame_size)
