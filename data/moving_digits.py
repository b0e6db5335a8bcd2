"""`moving_digits`: bouncing sklearn digits, generated locally (no download).

(One file, ~470 lines: the tfds builder, the dynamics and the re-rendering of clips share
one generator and must stay in step.)

Each clip shows `num_digits` digits from `sklearn.datasets.load_digits()` (the
bundled 1797 8x8 images, values 0..16), upsampled to `digit_size` and moving
with constant velocity inside a `canvas_size` square canvas, reflecting off the
walls. Digits are composited with a pixel-wise max; frames are uint8 0..255
with one channel.

Train and test clips draw from DISJOINT source digits (a fixed seeded 80/20
split of the 1797 images, the same for every config), so test metrics measure
generalisation to unseen digit images.

Everything needed to regenerate a clip exactly, for any number of frames, is
stored with it (`source_index`, `start`, `velocity`) and the numpy helpers here
(`digit_images_for`, `render_clip`, `regenerate_clip`) do it:

  video, positions = regenerate_clip(example, num_frames=64, config='default')
  # video[:T] == example['video'] exactly; positions[:T] == example['positions']

Dynamics (per digit, per axis, L = canvas_size - digit_size, in float64):
  u = (start + velocity * t) mod 2L ;  pos(t) = L - |L - u|     (t = 0, 1, ...)
i.e. straight motion reflected off the walls at 0 and L (the digit's top-left
corner). With exit_margin m > 0 the horizontal track is [-m, L + m] instead
(the same formula shifted by m, with L + 2m): digits leave the canvas and
come back (config 'exits'). `positions` stores pos(t) as float32; the digit is drawn with its
top-left pixel at floor(positions + 0.5) (computed in float32).

Usage (with `from data import moving_digits` at the top of your module):
  builder = moving_digits.prepare('tiny', data_dir)   # builds once, array_record
  source = builder.as_data_source('train')            # random access, no TF
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Mapping

import numpy as np
import tensorflow_datasets as tfds

from data import _tfds_utils
from data.errors import DataError

# The train/test split of the 1797 bundled digits. Fixed (not per config) so
# that the test digits of every config are unseen by the train clips of every
# config.
SPLIT_SEED = 1797
TEST_DIGIT_FRACTION = 0.2
NUM_SOURCE_DIGITS = 1797
_RAW_MAX = 16  # load_digits pixel values are integers 0..16.
MAX_EXIT_TILT_DEGREES = 30.0  # with exit_margin > 0: directions within this of horizontal
_INTERPOLATIONS = ("bilinear", "nearest")


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------


@dataclasses.dataclass(eq=False, kw_only=True)
class MovingDigitsConfig(tfds.core.BuilderConfig):
  """Settings of a `moving_digits` variant (stored in its data dir).

  Attributes:
    canvas_size: height = width of the frames, pixels.
    digit_size: side of each upsampled digit, pixels (<= canvas_size).
    num_digits: digits per clip.
    num_frames: clip length T stored in the dataset.
    speed_min, speed_max: speed range, pixels / frame (direction uniform).
    num_train, num_test: number of clips in each split.
    seed: generation seed (same seed -> identical data).
    interpolation: 'bilinear' or 'nearest' digit upsampling.
    exit_margin: pixels the digits' horizontal track extends beyond each side of the canvas
      (0: digits bounce off the walls). With a margin a digit leaves the canvas, stays out
      while it travels the rest of the margin, and comes back: its appearance must be
      remembered across the gap (the memory task). Its direction is then drawn within
      MAX_EXIT_TILT_DEGREES of horizontal, so that every clip's digit reaches a side.
  """

  canvas_size: int = 32
  digit_size: int = 12
  num_digits: int = 1
  num_frames: int = 8
  speed_min: float = 1.0
  speed_max: float = 2.5
  num_train: int = 2000
  num_test: int = 200
  seed: int = 0
  interpolation: str = "bilinear"
  exit_margin: int = 0

  def __post_init__(self):
    if not 1 <= self.digit_size <= self.canvas_size:
      raise DataError(
          f"need 1 <= digit_size <= canvas_size, got digit_size="
          f"{self.digit_size}, canvas_size={self.canvas_size}"
      )
    if self.num_digits < 1 or self.num_frames < 1:
      raise DataError(
          f"num_digits and num_frames must be >= 1, got {self.num_digits},"
          f" {self.num_frames}"
      )
    if not 0 <= self.speed_min <= self.speed_max:
      raise DataError(
          f"need 0 <= speed_min <= speed_max, got {self.speed_min},"
          f" {self.speed_max}"
      )
    if self.num_train < 1 or self.num_test < 1:
      raise DataError(
          f"num_train and num_test must be >= 1 (tfds cannot write empty"
          f" splits), got {self.num_train}, {self.num_test}"
      )
    if self.exit_margin < 0:
      raise DataError(f"exit_margin must be >= 0, got {self.exit_margin}")
    if self.interpolation not in _INTERPOLATIONS:
      raise DataError(
          f"interpolation must be one of {_INTERPOLATIONS}, got"
          f" {self.interpolation!r}"
      )

  def settings(self) -> dict[str, Any]:
    """The generation settings (everything but tfds bookkeeping fields)."""
    base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    out = {
        f.name: getattr(self, f.name)
        for f in dataclasses.fields(self)
        if f.name not in base
    }
    # Fields added later appear only when set: existing data dirs and custom-config names
    # (hashes of these settings) stay valid.
    if not out["exit_margin"]:
      del out["exit_margin"]
    return out


def _describe(settings: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={v}" for k, v in settings.items())


def _named(name: str, **settings) -> MovingDigitsConfig:
  cfg = MovingDigitsConfig(name=name, **settings)
  cfg.description = _describe(cfg.settings())
  return cfg


BUILDER_CONFIGS = [
    # 32x32 canvas, one 12x12 digit, 8 frames, 2000 / 200 clips.
    _named("default"),
    # Small and fast, for tests and smoke runs.
    _named(
        "tiny", canvas_size=16, digit_size=8, num_frames=4, num_train=64,
        num_test=16, speed_min=1.0, speed_max=2.0,
    ),
    # Slower digits (0.5-1.25 px / frame): the main job's recipe search.
    _named("slow", speed_min=0.5, speed_max=1.25),
    # The memory task: digits leave the canvas sideways for 3-6 chunks (of 2 frames) and come
    # back; 40-frame clips hold the exit and the return.
    _named("exits", exit_margin=20, speed_min=2.0, speed_max=3.0, num_frames=40),
    # Two digits per clip (occlusion by max-compositing).
    _named("two_digits", num_digits=2),
]
CONFIGS: dict[str, MovingDigitsConfig] = {c.name: c for c in BUILDER_CONFIGS}


def make_config(name: str | None = None, base: str = "default",
                **overrides) -> MovingDigitsConfig:
  """A custom config: `CONFIGS[base]` with `overrides`.

  Without `name`, the name is 'custom_<hash of settings>' so that different
  settings never share a data dir.
  """
  if base not in CONFIGS:
    raise DataError(f"unknown base config {base!r}; known: {sorted(CONFIGS)}")
  settings = {**CONFIGS[base].settings(), **overrides}
  if name is None:
    digest = hashlib.sha1(
        json.dumps(settings, sort_keys=True).encode()
    ).hexdigest()[:10]
    name = f"custom_{digest}"
  if name in CONFIGS and settings != CONFIGS[name].settings():
    raise DataError(
        f"config name {name!r} is a built-in config with other settings;"
        " choose another name"
    )
  return _named(name, **settings)


def get_config(config: str | MovingDigitsConfig) -> MovingDigitsConfig:
  if isinstance(config, MovingDigitsConfig):
    return config
  if config not in CONFIGS:
    raise DataError(
        f"unknown moving_digits config {config!r}; known: {sorted(CONFIGS)}"
    )
  return CONFIGS[config]


# ----------------------------------------------------------------------------
# Pure numpy helpers (used by the builder and by evaluation).
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
  """(images int64 [1797, 8, 8] in 0..16, labels int64 [1797]); read-only."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  d = load_digits()
  images = np.rint(d.images).astype(np.int64)
  labels = np.asarray(d.target, np.int64)
  if images.shape != (NUM_SOURCE_DIGITS, 8, 8):
    raise DataError(f"unexpected load_digits shape {images.shape}")
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


@functools.lru_cache(maxsize=2)
def split_source_indices(split: str) -> np.ndarray:
  """Sorted indices into `load_digits()` used by `split` ('train' / 'test').

  The two sets are disjoint and cover all 1797 digits (~80 / 20).
  """
  perm = np.random.default_rng(SPLIT_SEED).permutation(NUM_SOURCE_DIGITS)
  num_test = int(round(TEST_DIGIT_FRACTION * NUM_SOURCE_DIGITS))
  if split == "test":
    idx = perm[:num_test]
  elif split == "train":
    idx = perm[num_test:]
  else:
    raise DataError(f"split must be 'train' or 'test', got {split!r}")
  idx = np.sort(idx).astype(np.int64)
  idx.flags.writeable = False
  return idx


def _resize_weights(n_in: int, n_out: int, interpolation: str):
  """Integer 1-D resampling: out[i] = (w0*in[i0] + w1*in[i0+1]) / denom.

  Half-pixel-centre convention, edge clamped; exact integer arithmetic, so
  results are bit-identical on every platform.
  """
  i = np.arange(n_out, dtype=np.int64)
  denom = 2 * n_out
  if interpolation == "nearest":
    i0 = np.minimum(((2 * i + 1) * n_in) // denom, n_in - 1)
    return i0, i0, np.full(n_out, denom, np.int64), np.zeros(n_out, np.int64), denom
  # source coordinate of output centre, times denom.
  c = (2 * i + 1) * n_in - n_out
  c = np.clip(c, 0, (n_in - 1) * denom)
  i0 = np.minimum(c // denom, n_in - 1)
  frac = c - i0 * denom
  i1 = np.minimum(i0 + 1, n_in - 1)
  return i0, i1, denom - frac, frac, denom


def upsample_digits(raw: np.ndarray, digit_size: int,
                    interpolation: str = "bilinear") -> np.ndarray:
  """Resizes raw digits int [n, 8, 8] (0..16) to uint8 [n, s, s] (0..255)."""
  raw = np.asarray(raw, np.int64)
  if raw.ndim != 3:
    raise DataError(f"expected raw digits [n, h, w], got shape {raw.shape}")
  if interpolation not in _INTERPOLATIONS:
    raise DataError(f"interpolation must be one of {_INTERPOLATIONS}")
  y0, y1, wy0, wy1, dy = _resize_weights(raw.shape[1], digit_size, interpolation)
  x0, x1, wx0, wx1, dx = _resize_weights(raw.shape[2], digit_size, interpolation)
  rows = raw[:, y0, :] * wy0[None, :, None] + raw[:, y1, :] * wy1[None, :, None]
  out = rows[:, :, x0] * wx0[None, None, :] + rows[:, :, x1] * wx1[None, None, :]
  # out / (dy*dx) is in 0..16; scale to 0..255 and round half up (integers).
  den = dy * dx * _RAW_MAX
  out = (out * 255 * 2 + den) // (2 * den)
  return np.clip(out, 0, 255).astype(np.uint8)


def digit_images_for(source_index, digit_size: int,
                     interpolation: str = "bilinear") -> np.ndarray:
  """Upsampled uint8 [n, digit_size, digit_size] images of `load_digits()[i]`."""
  images, _ = _raw_digits()
  idx = np.asarray(source_index, np.int64).reshape(-1)
  return upsample_digits(images[idx], digit_size, interpolation)


def load_digit_images(split: str, digit_size: int = 12,
                      interpolation: str = "bilinear"):
  """The source digits of a split.

  Returns:
    (images uint8 [n, digit_size, digit_size] in 0..255, labels int64 [n] in
    0..9, source_indices int64 [n] into `sklearn.datasets.load_digits()`).
  """
  idx = split_source_indices(split)
  _, labels = _raw_digits()
  return (digit_images_for(idx, digit_size, interpolation), labels[idx].copy(),
          idx.copy())


def bounce_positions(start, velocity, num_frames: int, canvas_size: int,
                     digit_size: int, exit_margin: int = 0) -> np.ndarray:
  """float32 [T, n, 2] top-left (y, x) of each digit, reflecting off walls (horizontally at
  -exit_margin and canvas_size - digit_size + exit_margin)."""
  start = np.asarray(start, np.float32).astype(np.float64).reshape(-1, 2)
  velocity = np.asarray(velocity, np.float32).astype(np.float64).reshape(-1, 2)
  if start.shape != velocity.shape:
    raise DataError(f"start {start.shape} and velocity {velocity.shape} differ")
  span = float(canvas_size - digit_size)
  if span < 0:
    raise DataError(f"digit_size {digit_size} > canvas_size {canvas_size}")
  t = np.arange(num_frames, dtype=np.float64)[:, None, None]
  if span == 0 and not exit_margin:
    return np.zeros((num_frames,) + start.shape, np.float32)
  low = np.array([0.0, -float(exit_margin)])  # per axis (y, x): the track is [low, low + spans]
  spans = np.array([span, span + 2.0 * exit_margin])
  safe = np.where(spans > 0, spans, 1.0)  # an axis without room stays at its low end
  u = np.mod(start[None] - low + velocity[None] * t, 2.0 * safe)
  pos = np.where(spans > 0, safe - np.abs(safe - u), 0.0)
  return (np.clip(pos, 0.0, spans) + low).astype(np.float32)


def pixel_positions(positions: np.ndarray, canvas_size: int,
                    digit_size: int, exit_margin: int = 0) -> np.ndarray:
  """int64 top-left pixel where each digit is drawn: floor(positions + 0.5) (x may lie up to
  exit_margin beyond the canvas)."""
  p = np.floor(np.asarray(positions, np.float32) + np.float32(0.5))
  low = np.array([0, -exit_margin])
  return np.clip(p, low, canvas_size - digit_size - low).astype(np.int64)


def fully_visible(top_left: np.ndarray, canvas_size: int, digit_size: int) -> np.ndarray:
  """bool [...]: the digit at int top_left [..., 2] lies wholly on the canvas."""
  top_left = np.asarray(top_left)
  return np.all((top_left >= 0) & (top_left <= canvas_size - digit_size), axis=-1)


def gap_ends(top_left: np.ndarray, canvas_size: int, digit_size: int) -> np.ndarray:
  """int [V, n]: for top_left [V, T, n, 2], the first frame at which each digit is wholly on the
  canvas again after having been wholly off it (-1: no such return within the T frames)."""
  top_left = np.asarray(top_left)
  x = top_left[..., 1]
  off = (x <= -digit_size) | (x >= canvas_size)  # no pixel on the canvas
  on = fully_visible(top_left, canvas_size, digit_size)
  been_off = np.maximum.accumulate(off, axis=1)
  back = on & been_off
  return np.where(back.any(axis=1), back.argmax(axis=1), -1)


def render_clip(digit_images, start, velocity, num_frames: int,
                canvas_size: int, digit_size: int, exit_margin: int = 0):
  """Renders a clip from its dynamics.

  Args:
    digit_images: uint8 [n, digit_size, digit_size] (see `digit_images_for`).
    start: [n, 2] top-left (y, x) at frame 0.
    velocity: [n, 2] pixels / frame (y, x).
    num_frames: any T; the first frames equal the stored clip exactly.
    canvas_size, digit_size, exit_margin: as in the config.

  Returns:
    (video uint8 [T, canvas, canvas, 1], positions float32 [T, n, 2]).
  """
  digit_images = np.asarray(digit_images)
  if digit_images.ndim == 2:
    digit_images = digit_images[None]
  if digit_images.shape[1:] != (digit_size, digit_size):
    raise DataError(
        f"digit_images must be [n, {digit_size}, {digit_size}] (upsample with"
        f" digit_images_for), got {digit_images.shape}"
    )
  positions = bounce_positions(start, velocity, num_frames, canvas_size,
                               digit_size, exit_margin)
  if positions.shape[1] != digit_images.shape[0]:
    raise DataError(
        f"{digit_images.shape[0]} digit images but {positions.shape[1]} starts"
    )
  pix = pixel_positions(positions, canvas_size, digit_size, exit_margin)
  video = np.zeros((num_frames, canvas_size, canvas_size, 1), np.uint8)
  for t in range(num_frames):
    frame = video[t, :, :, 0]
    for k, img in enumerate(digit_images):
      y, x = pix[t, k]
      x0, x1 = max(x, 0), min(x + digit_size, canvas_size)  # the part on the canvas
      if x0 < x1:
        view = frame[y:y + digit_size, x0:x1]
        np.maximum(view, img[:, x0 - x:x1 - x], out=view)
  return video, positions


def regenerate_clip(example: Mapping[str, Any], num_frames: int,
                    config: str | MovingDigitsConfig = "default"):
  """Ground truth of a stored example extended (or cut) to `num_frames`."""
  cfg = get_config(config)
  images = digit_images_for(example["source_index"], cfg.digit_size,
                            cfg.interpolation)
  return render_clip(images, example["start"], example["velocity"], num_frames,
                     cfg.canvas_size, cfg.digit_size, cfg.exit_margin)


_SPLIT_IDS = {"train": 0, "test": 1}


def generate_example(cfg: MovingDigitsConfig, split: str, index: int):
  """The `index`-th example of `split` (deterministic in cfg.seed, split, index)."""
  rng = np.random.default_rng([cfg.seed, _SPLIT_IDS[split], index])
  pool = split_source_indices(split)
  _, all_labels = _raw_digits()
  n = cfg.num_digits
  source_index = pool[rng.integers(0, len(pool), size=n)].astype(np.int64)
  span = cfg.canvas_size - cfg.digit_size
  start = (rng.random((n, 2)) * span).astype(np.float32)
  speed = rng.uniform(cfg.speed_min, cfg.speed_max, size=n)
  if cfg.exit_margin:  # near-horizontal, either way: every digit reaches a side
    tilt = np.deg2rad(MAX_EXIT_TILT_DEGREES)
    angle = rng.uniform(-tilt, tilt, size=n) + np.pi * rng.integers(0, 2, size=n)
  else:
    angle = rng.uniform(0.0, 2.0 * np.pi, size=n)
  velocity = np.stack([speed * np.sin(angle), speed * np.cos(angle)],
                      axis=-1).astype(np.float32)
  images = digit_images_for(source_index, cfg.digit_size, cfg.interpolation)
  video, positions = render_clip(images, start, velocity, cfg.num_frames,
                                 cfg.canvas_size, cfg.digit_size, cfg.exit_margin)
  return {
      "video": video,
      "labels": all_labels[source_index].astype(np.int64),
      "positions": positions,
      "source_index": source_index,
      "start": start,
      "velocity": velocity,
  }


# ----------------------------------------------------------------------------
# tfds builder
# ----------------------------------------------------------------------------


class MovingDigits(tfds.core.GeneratorBasedBuilder):
  """Bouncing sklearn digits; registered in tfds as `moving_digits`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = BUILDER_CONFIGS
  DEFAULT_CONFIG_NAME = "default"

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # See _tfds_utils.code_path_of.
    return _tfds_utils.code_path_of(__file__)

  def __init__(self, *, file_format=None, **kwargs):
    # array_record by default: tfrecord would need TensorFlow.
    super().__init__(file_format=file_format or _tfds_utils.ARRAY_RECORD,
                     **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg: MovingDigitsConfig = self.builder_config
    t, s, n = cfg.num_frames, cfg.canvas_size, cfg.num_digits
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Bouncing sklearn load_digits digits (train/test use disjoint"
            " source digits). " + _describe(cfg.settings())
        ),
        features=tfds.features.FeaturesDict({
            "video": tfds.features.Tensor(shape=(t, s, s, 1), dtype=np.uint8),
            "labels": tfds.features.Tensor(shape=(n,), dtype=np.int64),
            "positions": tfds.features.Tensor(shape=(t, n, 2), dtype=np.float32),
            "source_index": tfds.features.Tensor(shape=(n,), dtype=np.int64),
            "start": tfds.features.Tensor(shape=(n, 2), dtype=np.float32),
            "velocity": tfds.features.Tensor(shape=(n, 2), dtype=np.float32),
        }),
        # Saved as metadata.json next to the data, checked by `prepare`.
        metadata=tfds.core.MetadataDict(settings=cfg.settings()),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    cfg = self.builder_config
    return {
        "train": self._generate_examples("train", cfg.num_train),
        "test": self._generate_examples("test", cfg.num_test),
    }

  def _generate_examples(self, split: str, num_examples: int):
    cfg = self.builder_config
    for i in range(num_examples):
      yield i, generate_example(cfg, split, i)


def prepare(config: str | MovingDigitsConfig = "default",
            data_dir: str | os.PathLike[str] | None = None) -> MovingDigits:
  """Returns the `moving_digits` builder, generating the data if not there yet.

  Data lives in `<data_dir>/moving_digits/<config name>/<version>/` as
  array_record files. `data_dir=None` means tfds' default ($TFDS_DATA_DIR or
  ~/tensorflow_datasets).

  Raises:
    DataError: unknown config; data_dir not writable when data must be built;
      data already there but generated with other settings for this name.
  """
  cfg = get_config(config)
  data_dir = os.fspath(data_dir) if data_dir is not None else (
      _tfds_utils.default_data_dir())
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise DataError(f"data_dir {data_dir!r} is not a directory (not writable)")
  builder = MovingDigits(config=cfg, data_dir=data_dir)
  if _tfds_utils.is_prepared(builder):
    stored = dict(builder.info.metadata or {}).get("settings")
    expected = json.loads(json.dumps(cfg.settings()))
    if stored is not None and stored != expected:
      raise DataError(
          f"{builder.data_dir} holds moving_digits/{cfg.name} generated with"
          f" settings {stored}, not {expected}; use another config name or"
          " data_dir"
      )
    return builder
  return _tfds_utils.prepare_builder(builder)
