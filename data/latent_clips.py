"""`latent_clips`: VAE latents of the clips of a video folder, as a tfds array_record dataset.

Clips are read exactly as `video_folder` reads them (`video_folder.iter_clips`: PyAV decode,
timestamp resampling to `fps`, resize to (height, width), clips of `num_frames` frames every
`stride` frames; unreadable or too-short files skipped with a warning), scaled to [-1, 1]
(x / 127.5 - 1), and encoded in batches by the VAE passed in. The dataset stores, per clip:
  latents [t, h, w, z] float32 (normalised latents), file, clip_index, start_time.

The VAE is any object with `encode(video) -> latents`, video [B, T, H, W, 3] float32 in [-1, 1]
and latents [B, t, h, w, z] (e.g. `hybrid_video.nn.vae.StreamingVAE` or `VAE`; this package does
not import the model package). `num_frames` must suit it (1 + 4 k for the Wan VAE).

Usage (with `from data import latent_clips` at the top of your module):
  builder = latent_clips.prepare('/path/to/videos', vae, data_dir, vae_name='wan2.1',
                                 num_frames=81, height=480, width=832, fps=16)
  latents = latent_clips.LatentSource(builder)[0]      # float32 [t, h, w, z], no TF
  # or data.pipeline.make_iterator(builder, batch_size=...) -> {'latents': [B, t, h, w, z], ...}

The config name is the `video_folder` name of the same settings plus a hash of `vae_name`, so
latents of different VAEs (or settings, or folder contents) never share a data dir:
  <data_dir>/latent_clips/<config name>/1.0.0/
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data import _tfds_utils
from data import pipeline
from data import video_folder
from data.errors import DataError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False, kw_only=True)
class LatentClipsConfig(tfds.core.BuilderConfig):
  """Settings of one `latent_clips` dataset (stored in its metadata.json).

  Attributes:
    video: the `video_folder` settings the clips are read with (channels must be 3).
    vae_name: names the VAE weights; part of the config name.
    latent_shape: (t, h, w, z) of one clip's latents.
    batch_size: clips encoded per VAE call.
  """

  video: video_folder.VideoFolderConfig | None = None
  vae_name: str = ""
  latent_shape: tuple[int, int, int, int] = (0, 0, 0, 0)
  batch_size: int = 1

  def settings(self) -> dict[str, Any]:
    return {"video": self.video.settings(), "vae_name": self.vae_name,
            "latent_shape": list(self.latent_shape), "batch_size": self.batch_size}


def latent_shape_of(vae: Any, num_frames: int, height: int, width: int) -> tuple[int, ...]:
  """(t, h, w, z) that `vae.encode` gives for one clip, found by tracing only (no compute)."""
  import jax  # pylint: disable=g-import-not-at-top  # only needed to trace the encoder

  spec = jax.ShapeDtypeStruct((1, num_frames, height, width, 3), np.float32)
  try:
    out = jax.eval_shape(vae.encode, spec)
  except ValueError as e:  # the model's own UserErrors are ValueErrors
    raise DataError(f"the VAE cannot encode clips of {num_frames} frames of {height}x{width}: "
                    f"{e}") from e
  if len(out.shape) != 5:
    raise DataError(f"vae.encode returned shape {out.shape}; expected [B, t, h, w, z]")
  return tuple(int(d) for d in out.shape[1:])


def make_config(folder: str | os.PathLike[str], vae: Any, *, vae_name: str,
                batch_size: int = 1, **video_settings) -> LatentClipsConfig:
  """A `LatentClipsConfig` for `folder`; `video_settings` are `VideoFolderConfig` fields.

  Raises:
    DataError: folder missing or without videos, grayscale clips, a clip shape the VAE cannot
      encode, an empty `vae_name` or `batch_size` < 1.
  """
  if not vae_name:
    raise DataError("latent_clips needs a vae_name naming the VAE weights (part of the dataset "
                    "name, so latents of different VAEs never mix)")
  if batch_size < 1:
    raise DataError(f"batch_size must be >= 1, got {batch_size}")
  video = video_folder.make_config(folder, **video_settings)
  if video.channels != 3:
    raise DataError(f"latent_clips needs RGB clips (channels=3), got channels={video.channels}")
  shape = latent_shape_of(vae, video.num_frames, video.height, video.width)
  digest = hashlib.sha1(vae_name.encode()).hexdigest()[:8]
  cfg = LatentClipsConfig(name=f"{video.name}_{digest}", video=video, vae_name=vae_name,
                          latent_shape=shape, batch_size=batch_size)
  cfg.description = f"vae={vae_name}, {video.description}"
  return cfg


def to_unit_range(video: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 in [-1, 1], as `pipeline.to_model_inputs` scales videos."""
  return video.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


class LatentClips(tfds.core.GeneratorBasedBuilder):
  """Latents of a video folder's clips; registered in tfds as `latent_clips`.

  Writing needs the VAE (`LatentClips(config=..., vae=vae, data_dir=...)`); reading a prepared
  dataset does not (`tfds.builder_from_directory` or `LatentSource(path)`).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # See _tfds_utils.code_path_of.
    return _tfds_utils.code_path_of(__file__)

  def __init__(self, *, vae: Any = None, file_format=None, **kwargs):
    self._vae = vae
    super().__init__(file_format=file_format or _tfds_utils.ARRAY_RECORD, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    if not isinstance(cfg, LatentClipsConfig):
      raise DataError("latent_clips needs a LatentClipsConfig (make_config)")
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"VAE latents of the clips of {cfg.video.folder}.",
        features=tfds.features.FeaturesDict({
            "latents": tfds.features.Tensor(shape=tuple(cfg.latent_shape), dtype=np.float32),
            "file": tfds.features.Text(),  # Path relative to the folder.
            "clip_index": tfds.features.Scalar(dtype=np.int64),
            "start_time": tfds.features.Scalar(dtype=np.float32),  # seconds
        }),
        metadata=tfds.core.MetadataDict(settings=cfg.settings()),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    if self._vae is None:
      raise DataError("writing latent_clips needs the VAE: LatentClips(vae=...)")
    cfg = self.builder_config
    # video_folder's own scan and split: the same files are usable, skipped (with the same
    # warnings) and in the same split as in the video_folder dataset of these settings.
    splits, skipped = video_folder.split_files(cfg.video)
    self.info.metadata.update(video_folder.files_metadata(cfg.video.folder, splits, skipped))
    return {k: self._generate_examples(v) for k, v in splits.items()}

  def _iter_clips(self, paths: list[str]):
    cfg = self.builder_config.video
    for path in paths:
      name = os.path.relpath(path, cfg.folder)
      try:
        for clip_index, start_time, video in video_folder.iter_clips(path, cfg):
          yield name, clip_index, start_time, video
      except video_folder.decode_errors() as e:
        logger.warning("Video %s failed while reading clips (%s: %s); keeping the clips before"
                       " the failure", path, type(e).__name__, e)

  def _encode(self, batch: list[tuple]):
    cfg = self.builder_config
    videos = np.stack([to_unit_range(clip[3]) for clip in batch])
    latents = np.asarray(self._vae.encode(videos), np.float32)
    if latents.shape != (len(batch), *cfg.latent_shape):
      raise DataError(f"vae.encode gave {latents.shape}, expected "
                      f"{(len(batch), *cfg.latent_shape)}")
    for (name, clip_index, start_time, _), z in zip(batch, latents):
      yield f"{name}#{clip_index}", {"latents": z, "file": name, "clip_index": clip_index,
                                      "start_time": np.float32(start_time)}

  def _generate_examples(self, paths: list[str]):
    batch = []
    for clip in self._iter_clips(paths):
      batch.append(clip)
      if len(batch) == self.builder_config.batch_size:
        yield from self._encode(batch)
        batch = []
    if batch:
      yield from self._encode(batch)


def prepare(folder_or_config: str | os.PathLike[str] | LatentClipsConfig, vae: Any,
            data_dir: str | os.PathLike[str] | None = None, *, vae_name: str | None = None,
            batch_size: int = 1, **video_settings) -> LatentClips:
  """Returns the `latent_clips` builder, encoding and writing the clips if not there yet.

  Args:
    folder_or_config: a video folder (then `vae_name`, `batch_size` and `video_settings` go to
      `make_config`) or a `LatentClipsConfig`.
    vae: has `encode(video [B, T, H, W, 3] in [-1, 1]) -> latents [B, t, h, w, z]`.
    data_dir: tfds data dir root (None: $TFDS_DATA_DIR or ~/tensorflow_datasets).
    vae_name: names the VAE weights (required with a folder).
    batch_size: clips per `vae.encode` call.
    **video_settings: `VideoFolderConfig` fields (num_frames, height, width, fps, stride,
      test_fraction, seed, recursive, interpolation, name).

  Raises:
    DataError: see `make_config`; an unwritable data_dir.
  """
  if isinstance(folder_or_config, LatentClipsConfig):
    if video_settings or vae_name is not None:
      raise DataError("pass settings either in the config or as kwargs")
    cfg = folder_or_config
  else:
    cfg = make_config(folder_or_config, vae, vae_name=vae_name or "", batch_size=batch_size,
                      **video_settings)
  data_dir = os.fspath(data_dir) if data_dir is not None else _tfds_utils.default_data_dir()
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise DataError(f"data_dir {data_dir!r} is not a directory (not writable)")
  return _tfds_utils.prepare_builder(LatentClips(config=cfg, vae=vae, data_dir=data_dir))


class LatentSource:
  """Random access to a prepared `latent_clips` split: item i is float32 latents [t, h, w, z].

  Accepts what `pipeline.get_source` accepts (a builder, a prepared dataset dir, ...);
  `example(i)` gives the whole record (latents, file, clip_index, start_time).
  """

  def __init__(self, builder_or_source: Any, split: str = "train"):
    self.source = pipeline.get_source(builder_or_source, split)

  def __len__(self) -> int:
    return len(self.source)

  def example(self, index: int) -> dict[str, Any]:
    return self.source[index]

  def __getitem__(self, index: int) -> np.ndarray:
    example = self.source[index]
    if "latents" not in example:
      raise DataError(f"record {index} has no 'latents' (keys: {sorted(example)}); is this a "
                      "latent_clips dataset?")
    return np.asarray(example["latents"], np.float32)
