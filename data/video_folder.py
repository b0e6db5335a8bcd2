"""`video_folder`: fixed-length clips from a folder of .mp4 / .webm files.

(One file, ~420 lines: scanning, decoding, resampling and the tfds builder of one source.)

Files are decoded with PyAV (no TensorFlow, no mediapy), resampled to the
target frame rate by timestamp (sample-and-hold: target time k/fps, measured
from the file's first frame, shows the latest source frame at or before it),
resized with swscale to (height, width) (aspect ratio not kept) and cut into
clips of `num_frames` frames whose starts are `stride` target frames apart
(default: non-overlapping). The tail shorter than a clip is dropped.

Unreadable / corrupt files, files without a video stream and files too short
for one clip are skipped with a `logging.warning` naming the file. A missing
folder, or one without a usable video, raises `data.DataError` naming it.

Split: all clips go to 'train'; with `test_fraction > 0`, a seeded random
subset of whole FILES goes to 'test' (clips of one video never straddle the
split).

Usage (with `from data import video_folder` at the top of your module):
  builder = video_folder.prepare('/path/to/videos', data_dir, num_frames=16,
                                 height=64, width=64, fps=8)
  source = builder.as_data_source('train')   # random access, no TF

The config name defaults to '<folder name>_<hash>', the hash covering the
settings and the folder listing (names, sizes, mtimes), so different settings
or a changed folder get their own data dir:
  <data_dir>/video_folder/<config name>/1.0.0/
`prepare` decodes each file twice: once to validate it and count its clips
(before anything is written), once to write the clips.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from data import _tfds_utils
from data.errors import DataError

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".webm")
_TIME_EPS = 1e-6


@dataclasses.dataclass(eq=False, kw_only=True)
class VideoFolderConfig(tfds.core.BuilderConfig):
  """Settings of one `video_folder` dataset (stored in its metadata.json).

  Attributes:
    folder: directory searched (recursively if `recursive`) for .mp4/.webm.
    num_frames: clip length T.
    height, width: frame size after resizing.
    fps: target frame rate; frames are resampled by timestamp.
    channels: 3 (RGB) or 1 (grayscale).
    stride: target frames between consecutive clip starts (None: num_frames).
    test_fraction: fraction of files whose clips go to a 'test' split (0: no
      'test' split).
    seed: seed of the file-level train/test assignment.
    recursive: also search subfolders.
    interpolation: swscale interpolation name (e.g. 'BILINEAR', 'AREA').
  """

  folder: str = ""
  num_frames: int = 16
  height: int = 64
  width: int = 64
  fps: float = 8.0
  channels: int = 3
  stride: int | None = None
  test_fraction: float = 0.0
  seed: int = 0
  recursive: bool = True
  interpolation: str = "BILINEAR"

  def __post_init__(self):
    if not self.folder:
      raise DataError("VideoFolderConfig needs a folder")
    if self.num_frames < 1 or self.height < 1 or self.width < 1:
      raise DataError(
          "num_frames, height and width must be >= 1, got"
          f" {self.num_frames}, {self.height}, {self.width}"
      )
    if not self.fps > 0:
      raise DataError(f"fps must be > 0, got {self.fps}")
    if self.channels not in (1, 3):
      raise DataError(f"channels must be 1 or 3, got {self.channels}")
    if self.stride is not None and self.stride < 1:
      raise DataError(f"stride must be >= 1 or None, got {self.stride}")
    if not 0.0 <= self.test_fraction < 1.0:
      raise DataError(
          f"test_fraction must be in [0, 1), got {self.test_fraction}"
      )

  @property
  def clip_stride(self) -> int:
    return self.stride if self.stride is not None else self.num_frames

  def settings(self) -> dict[str, Any]:
    base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    return {
        f.name: getattr(self, f.name)
        for f in dataclasses.fields(self)
        if f.name not in base
    }


# ----------------------------------------------------------------------------
# Folder scanning and decoding (PyAV)
# ----------------------------------------------------------------------------


def list_video_files(folder: str | os.PathLike[str],
                     recursive: bool = True) -> list[str]:
  """Sorted absolute paths of .mp4/.webm files (case-insensitive extension).

  Raises:
    DataError: the folder does not exist or is not a directory.
  """
  folder = os.path.abspath(os.fspath(folder))
  if not os.path.isdir(folder):
    raise DataError(f"video folder {folder!r} does not exist or is not a"
                    " directory")
  found = []
  if recursive:
    for root, dirs, files in os.walk(folder):
      dirs.sort()
      found += [os.path.join(root, f) for f in files]
  else:
    found = [os.path.join(folder, f) for f in os.listdir(folder)]
  return sorted(
      p for p in found
      if p.lower().endswith(VIDEO_EXTENSIONS) and os.path.isfile(p)
  )


def _folder_fingerprint(folder: str, recursive: bool) -> list[list[Any]]:
  out = []
  for p in list_video_files(folder, recursive):
    st = os.stat(p)
    out.append([os.path.relpath(p, folder), st.st_size, st.st_mtime_ns])
  return out


def decode_errors() -> tuple[type[BaseException], ...]:
  """The exceptions a broken or unreadable video raises while decoding."""
  import av  # pylint: disable=g-import-not-at-top

  return (av.error.FFmpegError, OSError, ValueError, EOFError)


def iter_resampled_frames(path: str, fps: float) -> Iterator[tuple[int, Any]]:
  """Yields (k, av.VideoFrame) for target times t0 + k / fps, k = 0, 1, ...

  Sample-and-hold on presentation timestamps: target k shows the latest
  decoded frame whose time is <= t0 + k / fps (t0: first frame's time); the
  last frame is held for one source frame duration. Consecutive k may yield
  the same frame object (upsampling) and source frames may be skipped
  (downsampling).
  """
  import av  # pylint: disable=g-import-not-at-top

  with av.open(path) as container:
    if not container.streams.video:
      raise ValueError("no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    frame_dur = 1.0 / float(rate) if rate else 1.0 / fps
    t0 = None
    prev = prev_t = None
    k = 0
    for i, frame in enumerate(container.decode(stream)):
      t = frame.time
      if t is None:
        t = (prev_t + frame_dur) if prev_t is not None else i * frame_dur
      if t0 is None:
        t0 = t
      if prev is not None:
        if t <= prev_t:  # Non-increasing timestamp: keep the newest frame.
          prev = frame
          continue
        while t0 + k / fps < t - _TIME_EPS:
          yield k, prev
          k += 1
      prev, prev_t = frame, t
    if prev is None:
      raise ValueError("no decodable video frame")
    end = prev_t + frame_dur
    while t0 + k / fps < end - _TIME_EPS:
      yield k, prev
      k += 1


def _num_clips(num_target_frames: int, num_frames: int, stride: int) -> int:
  if num_target_frames < num_frames:
    return 0
  return (num_target_frames - num_frames) // stride + 1


def probe_file(path: str, cfg: VideoFolderConfig) -> int:
  """Decodes `path` fully (no pixel conversion); returns its number of clips."""
  n = 0
  for n, _ in iter_resampled_frames(path, cfg.fps):
    pass
  return _num_clips(n + 1, cfg.num_frames, cfg.clip_stride)


def iter_clips(path: str, cfg: VideoFolderConfig):
  """Yields (clip_index, start_time_seconds, uint8 [T, H, W, C]) for `path`."""
  fmt = "rgb24" if cfg.channels == 3 else "gray"
  t_len, stride = cfg.num_frames, cfg.clip_stride
  next_start = 0
  buf: list[np.ndarray] = []  # frames next_start, next_start + 1, ...
  last_frame = last_array = None
  clip_index = 0
  for k, frame in iter_resampled_frames(path, cfg.fps):
    if k < next_start:
      continue  # Gap between clips (stride > num_frames).
    if frame is not last_frame:
      arr = frame.to_ndarray(width=cfg.width, height=cfg.height, format=fmt,
                             interpolation=cfg.interpolation)
      if arr.ndim == 2:
        arr = arr[:, :, None]
      last_frame, last_array = frame, arr
    buf.append(last_array)
    if len(buf) == t_len:
      yield clip_index, next_start / cfg.fps, np.stack(buf).astype(np.uint8)
      clip_index += 1
      next_start += stride
      buf = buf[stride:] if stride < t_len else []


# ----------------------------------------------------------------------------
# Config helpers
# ----------------------------------------------------------------------------


def scan_files(cfg: VideoFolderConfig) -> tuple[list[str], list[str]]:
  """Returns (usable files, skipped files) of `cfg.folder`, warning about each skipped one.

  Raises:
    DataError: no video files, or none usable.
  """
  files = list_video_files(cfg.folder, cfg.recursive)
  if not files:
    raise DataError(
        f"video folder {cfg.folder!r} has no"
        f" {'/'.join(VIDEO_EXTENSIONS)} files"
    )
  usable, skipped = [], []
  for path in files:
    try:
      n = probe_file(path, cfg)
    except decode_errors() as e:
      logger.warning("Skipping unreadable video %s: %s: %s", path,
                     type(e).__name__, e)
      skipped.append(path)
      continue
    if n == 0:
      logger.warning(
          "Skipping video %s: shorter than one clip of %d frames at %g fps",
          path, cfg.num_frames, cfg.fps)
      skipped.append(path)
      continue
    usable.append(path)
  if not usable:
    raise DataError(
        f"video folder {cfg.folder!r} has no usable video (of {len(files)}"
        f" candidate files, none could be decoded into a clip of"
        f" {cfg.num_frames} frames at {cfg.fps:g} fps)"
    )
  return usable, skipped


def split_files(cfg: VideoFolderConfig
                ) -> tuple[dict[str, list[str]], list[str]]:
  """({"train": [...], "test": [...]}, skipped): the usable files of `cfg.folder` split by
  `cfg.test_fraction` with `cfg.seed` (no "test" split when the fraction is 0). Every reader of
  a video folder (`video_folder`, `latent_clips`) splits with this, so the same file lands in
  the same split whichever dataset is built from it.
  """
  usable, skipped = scan_files(cfg)
  if cfg.test_fraction <= 0:
    return {"train": usable}, skipped
  if len(usable) < 2:
    raise DataError(
        f"test_fraction={cfg.test_fraction} needs at least 2 usable videos"
        f" in {cfg.folder!r}, found {len(usable)}"
    )
  n_test = min(max(1, int(round(cfg.test_fraction * len(usable)))),
               len(usable) - 1)
  perm = np.random.default_rng(cfg.seed).permutation(len(usable))
  test_ids = set(perm[:n_test].tolist())
  return {
      "train": [p for i, p in enumerate(usable) if i not in test_ids],
      "test": [p for i, p in enumerate(usable) if i in test_ids],
  }, skipped


def files_metadata(folder: str, splits: dict[str, list[str]],
                   skipped: list[str]) -> dict[str, Any]:
  """The dataset metadata naming each split's files and the skipped ones (relative paths)."""
  rel = lambda p: os.path.relpath(p, folder)
  return {"files": {k: [rel(p) for p in v] for k, v in splits.items()},
          "skipped_files": [rel(p) for p in skipped]}


def make_config(folder: str | os.PathLike[str], name: str | None = None,
                **settings) -> VideoFolderConfig:
  """A `VideoFolderConfig` for `folder`; see the class for `settings`.

  Without `name`, it is '<folder basename>_<hash>' where the hash covers the
  settings and the folder listing, so data dirs never collide.

  Raises:
    DataError: folder missing, or no .mp4/.webm file in it.
  """
  folder = os.path.abspath(os.fspath(folder))
  cfg = VideoFolderConfig(name=name or "unnamed", folder=folder, **settings)
  listing = _folder_fingerprint(folder, cfg.recursive)
  if not listing:
    raise DataError(
        f"video folder {folder!r} has no {'/'.join(VIDEO_EXTENSIONS)} files"
    )
  if name is None:
    digest = hashlib.sha1(
        json.dumps([cfg.settings(), listing], sort_keys=True).encode()
    ).hexdigest()[:10]
    base = re.sub(r"[^a-z0-9_]+", "_", os.path.basename(folder).lower())
    cfg.name = f"{base.strip('_') or 'videos'}_{digest}"
  cfg.description = ", ".join(f"{k}={v}" for k, v in cfg.settings().items())
  return cfg


# ----------------------------------------------------------------------------
# tfds builder
# ----------------------------------------------------------------------------


class VideoFolder(tfds.core.GeneratorBasedBuilder):
  """Clips from a user's video folder; registered in tfds as `video_folder`.

  Needs a `VideoFolderConfig` (see `make_config` / `prepare`).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # See _tfds_utils.code_path_of.
    return _tfds_utils.code_path_of(__file__)

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or _tfds_utils.ARRAY_RECORD,
                     **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    if not isinstance(cfg, VideoFolderConfig):
      raise DataError("video_folder needs a VideoFolderConfig (make_config)")
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Clips from the videos in {cfg.folder}.",
        features=tfds.features.FeaturesDict({
            "video": tfds.features.Tensor(
                shape=(cfg.num_frames, cfg.height, cfg.width, cfg.channels),
                dtype=np.uint8,
            ),
            "file": tfds.features.Text(),  # Path relative to the folder.
            "clip_index": tfds.features.Scalar(dtype=np.int64),
            "start_time": tfds.features.Scalar(dtype=np.float32),  # seconds
        }),
        metadata=tfds.core.MetadataDict(settings=cfg.settings()),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    cfg = self.builder_config
    splits, skipped = split_files(cfg)
    self.info.metadata.update(files_metadata(cfg.folder, splits, skipped))
    return {k: self._generate_examples(v) for k, v in splits.items()}

  def _generate_examples(self, paths: list[str]):
    cfg = self.builder_config
    for path in paths:
      name = os.path.relpath(path, cfg.folder)
      try:
        for clip_index, start_time, video in iter_clips(path, cfg):
          yield f"{name}#{clip_index}", {
              "video": video,
              "file": name,
              "clip_index": clip_index,
              "start_time": np.float32(start_time),
          }
      except decode_errors() as e:  # Passed the scan but failed now.
        logger.warning("Video %s failed while writing clips (%s: %s); keeping"
                       " the clips before the failure", path,
                       type(e).__name__, e)


def prepare(folder_or_config: str | os.PathLike[str] | VideoFolderConfig,
            data_dir: str | os.PathLike[str] | None = None,
            **settings) -> VideoFolder:
  """Returns the `video_folder` builder, writing the clips if not there yet.

  Args:
    folder_or_config: a folder (then `settings` go to `make_config`) or a
      `VideoFolderConfig`.
    data_dir: tfds data dir root (None: $TFDS_DATA_DIR or ~/tensorflow_datasets).
    **settings: VideoFolderConfig fields (num_frames, height, width, fps,
      channels, stride, test_fraction, seed, recursive, interpolation, name).

  Raises:
    DataError: missing folder, no usable video, unwritable data_dir.
  """
  if isinstance(folder_or_config, VideoFolderConfig):
    if settings:
      raise DataError("pass settings either in the config or as kwargs")
    cfg = folder_or_config
    list_video_files(cfg.folder, cfg.recursive)  # Clear error if missing.
  else:
    cfg = make_config(folder_or_config, **settings)
  data_dir = os.fspath(data_dir) if data_dir is not None else (
      _tfds_utils.default_data_dir())
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise DataError(f"data_dir {data_dir!r} is not a directory (not writable)")
  builder = VideoFolder(config=cfg, data_dir=data_dir)
  return _tfds_utils.prepare_builder(builder)
