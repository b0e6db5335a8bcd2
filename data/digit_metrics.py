"""Moving-Digits ground truth and digit metrics for the long-horizon evaluation (numpy; frames
in [0, 1]). Generic frame metrics (PSNR, SSIM) are in hybrid_video/video_metrics.py.

- `ground_truth`: test clips re-rendered for any length, with each digit's position and image.
- `DigitClassifier`: an RBF SVM on upsampled digit crops of the bundled sklearn digits' TRAIN
  split (moving_digits.split_source_indices), trained with +-1 pixel shifts; every crop is
  scaled to max 1 first, so dim generated digits are read like bright ones. A crop with no ink
  (max < ink_threshold) is classified -1 ("no digit").
- `locate_digits`: each digit's top-left position in a frame, found by template matching: the
  digit's own image (known from the clip's source_index) is compared (sum of squared
  differences) with every window whose top-left lies within `radius` pixels (Chebyshev) of the
  true position; the best window wins. With no ink in the searched area the digit is lost.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from data import moving_digits
from data.errors import DataError


@dataclasses.dataclass
class GroundTruth:
  video: np.ndarray        # uint8 [V, T, H, W, 1]
  top_left: np.ndarray     # int [V, T, n, 2], where each digit is drawn
  labels: np.ndarray       # int [V, n]
  templates: np.ndarray    # float [V, n, s, s] in [0, 1], each digit's image
  clip_frames: int         # length of the stored (training) clips
  digit_size: int
  interpolation: str
  visible: np.ndarray | None = None   # bool [V, T, n]: digit wholly on the canvas (None: always)
  gap_end: np.ndarray | None = None   # int [V, n]: first frame wholly back on the canvas after
  #                                     being wholly off it (moving_digits.gap_ends; -1: none)

  @property
  def frames01(self) -> np.ndarray:
    return self.video.astype(np.float32) / 255.0


def ground_truth(source, dcfg, num_videos: int, total_frames: int) -> GroundTruth:
  """The first `num_videos` clips of a split `source`, re-rendered for `total_frames` frames.
  dcfg: the moving_digits config the clips were made with. With exit_margin, top_left may lie
  off the canvas; `visible` and `gap_end` say when each digit is on it."""
  margin = int(getattr(dcfg, "exit_margin", 0) or 0)
  videos, tops, labels, templates = [], [], [], []
  for i in range(num_videos):
    ex = source[i]
    video, positions = moving_digits.regenerate_clip(ex, total_frames, dcfg)
    videos.append(video)
    tops.append(moving_digits.pixel_positions(positions, dcfg.canvas_size, dcfg.digit_size,
                                              margin))
    labels.append(np.asarray(ex["labels"], np.int64))
    templates.append(moving_digits.digit_images_for(ex["source_index"], dcfg.digit_size,
                                                    dcfg.interpolation))
  top_left = np.stack(tops)
  visible = gap_end = None
  if margin:
    visible = moving_digits.fully_visible(top_left, dcfg.canvas_size, dcfg.digit_size)
    gap_end = moving_digits.gap_ends(top_left, dcfg.canvas_size, dcfg.digit_size)
  return GroundTruth(video=np.stack(videos), top_left=top_left, labels=np.stack(labels),
                     templates=np.stack(templates).astype(np.float32) / 255.0,
                     clip_frames=int(dcfg.num_frames), digit_size=int(dcfg.digit_size),
                     interpolation=dcfg.interpolation, visible=visible, gap_end=gap_end)


def crops(frames: np.ndarray, top_left: np.ndarray, size: int) -> np.ndarray:
  """Windows of side `size`. frames [..., H, W]; top_left int [..., n, 2] -> [..., n, size, size].

  Windows must lie inside the frame (moving_digits positions always do)."""
  frames = np.asarray(frames)
  lead = frames.shape[:-2]
  n = top_left.shape[-2]
  f = frames.reshape(-1, *frames.shape[-2:])
  tl = np.asarray(top_left, np.int64).reshape(-1, n, 2)
  r = np.arange(size)
  rows = (tl[..., 0, None] + r)[..., :, None]  # [M, n, s, 1]
  cols = (tl[..., 1, None] + r)[..., None, :]  # [M, n, 1, s]
  out = f[np.arange(len(f))[:, None, None, None], rows, cols]
  return out.reshape(*lead, n, size, size)


def locate_digits(frames: np.ndarray, templates: np.ndarray, true_top_left: np.ndarray, *,
                  radius: int, ink_threshold: float = 0.25):
  """Template-matched top-left of each digit near its true position.

  frames [..., H, W] in [0, 1]; templates [..., n, s, s] in [0, 1] (broadcast over frames'
  leading dims when they have fewer of them); true_top_left int [..., n, 2].
  Returns (found int [..., n, 2], lost bool [..., n]). A digit is lost when the searched area
  (every candidate window) holds no pixel >= ink_threshold.
  """
  frames = np.asarray(frames, np.float32)
  h, w = frames.shape[-2:]
  s = templates.shape[-1]
  true_top_left = np.asarray(true_top_left, np.int64)
  templates = np.broadcast_to(np.asarray(templates, np.float32),
                              (*true_top_left.shape[:-1], s, s))
  best = np.full(true_top_left.shape[:-1], np.inf)
  found = true_top_left.copy()
  ink = np.zeros(true_top_left.shape[:-1], bool)
  for dy, dx in _shifts_by_distance(radius):
    cand = true_top_left + np.array([dy, dx])
    valid = ((cand[..., 0] >= 0) & (cand[..., 0] <= h - s) &
             (cand[..., 1] >= 0) & (cand[..., 1] <= w - s))
    safe = np.where(valid[..., None], cand, true_top_left)
    win = crops(frames, safe, s)
    ssd = np.sum((win - templates) ** 2, axis=(-2, -1))
    ssd = np.where(valid, ssd, np.inf)
    ink |= valid & (win.max(axis=(-2, -1)) >= ink_threshold)
    better = ssd < best  # strict: a tie keeps the candidate nearer the truth (searched first)
    best = np.where(better, ssd, best)
    found = np.where(better[..., None], cand, found)
  return found, ~ink


@functools.lru_cache(maxsize=8)
def _shifts_by_distance(radius: int) -> tuple[tuple[int, int], ...]:
  shifts = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
  return tuple(sorted(shifts, key=lambda d: (d[0] ** 2 + d[1] ** 2, d)))


class DigitClassifier:
  """Digit identity from a crop [..., s, s] in [0, 1] (see module docstring)."""

  def __init__(self, digit_size: int, interpolation: str = "bilinear", *,
               ink_threshold: float = 0.25, seed: int = 0):
    from sklearn.svm import SVC  # pylint: disable=g-import-not-at-top
    self.digit_size = int(digit_size)
    self.ink_threshold = float(ink_threshold)
    images, labels, _ = moving_digits.load_digit_images("train", self.digit_size, interpolation)
    x = images.astype(np.float32) / 255.0
    shifted, ys = [], []
    for dy, dx in ((0, 0), (0, 1), (1, 0), (0, -1), (-1, 0)):
      shifted.append(_shift(x, dy, dx))
      ys.append(labels)
    self.svm = SVC(C=5.0, gamma="scale", random_state=seed)
    self.svm.fit(self._features(np.concatenate(shifted)), np.concatenate(ys))
    self.test_accuracy = self.accuracy("test", interpolation)
    self.train_accuracy = self.accuracy("train", interpolation)

  def _features(self, x: np.ndarray) -> np.ndarray:
    x = x.reshape(-1, self.digit_size * self.digit_size).astype(np.float32)
    return x / np.maximum(x.max(axis=1, keepdims=True), 1e-6)

  def predict(self, crops_: np.ndarray) -> np.ndarray:
    """crops [..., s, s] in [0, 1] -> int labels [...], -1 where the crop has no ink."""
    crops_ = np.asarray(crops_, np.float32)
    lead = crops_.shape[:-2]
    flat = crops_.reshape(-1, self.digit_size, self.digit_size)
    out = np.full(len(flat), -1, np.int64)
    has_ink = flat.max(axis=(1, 2)) >= self.ink_threshold
    if has_ink.any():
      out[has_ink] = self.svm.predict(self._features(flat[has_ink]))
    return out.reshape(lead)

  def accuracy(self, split: str, interpolation: str = "bilinear") -> float:
    images, labels, _ = moving_digits.load_digit_images(split, self.digit_size, interpolation)
    return float(np.mean(self.predict(images.astype(np.float32) / 255.0) == labels))


def _shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """Shift images [n, s, s] by (dy, dx) pixels, filling with 0 (no wrap-around)."""
  out = np.zeros_like(x)
  s = x.shape[-1]
  ys, yd = (slice(0, s - dy), slice(dy, s)) if dy >= 0 else (slice(-dy, s), slice(0, s + dy))
  xs, xd = (slice(0, s - dx), slice(dx, s)) if dx >= 0 else (slice(-dx, s), slice(0, s + dx))
  out[:, yd, xd] = x[:, ys, xs]
  return out


@functools.lru_cache(maxsize=4)
def digit_classifier(digit_size: int, interpolation: str = "bilinear",
                     ink_threshold: float = 0.25) -> DigitClassifier:
  """The classifier for a digit size, trained once per process (about a second)."""
  return DigitClassifier(digit_size, interpolation, ink_threshold=ink_threshold)


# -- metrics of a generated video without its ground truth (the main job's targets) -------------


@dataclasses.dataclass
class FrameDigits:
  """What one frame shows: ink blobs and the largest one's centre and crop."""
  blobs: np.ndarray        # int [T]: connected ink components of at least min_blob pixels
  centre: np.ndarray       # float [T, 2]: ink-weighted centre (row, col) of the largest blob
  crop: np.ndarray         # float [T, s, s]: digit-size window centred there (zero padded)


def frame_digits(frames: np.ndarray, digit_size: int, *, ink_threshold: float = 0.25,
                 min_blob: int = 4) -> FrameDigits:
  """Blobs, centre and crop of each frame [T, H, W] in [0, 1] (8-connected components of pixels
  >= ink_threshold; blobs smaller than min_blob pixels are speckle, not digits)."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  frames = np.asarray(frames, np.float32)
  t, h, w = frames.shape
  s = int(digit_size)
  blobs = np.zeros(t, np.int64)
  centre = np.full((t, 2), np.nan)
  crop = np.zeros((t, s, s), np.float32)
  padded = np.pad(frames, ((0, 0), (s, s), (s, s)))
  for i, frame in enumerate(frames):
    labels, n = ndimage.label(frame >= ink_threshold, structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    big = np.flatnonzero(sizes >= min_blob) + 1
    blobs[i] = len(big)
    if not len(big):
      continue
    largest = big[np.argmax(sizes[big - 1])]
    weight = np.where(labels == largest, frame, 0.0)
    rows, cols = np.indices(frame.shape)
    centre[i] = (weight * rows).sum() / weight.sum(), (weight * cols).sum() / weight.sum()
    r0 = int(np.floor(centre[i, 0] - (s - 1) / 2 + 0.5)) + s
    c0 = int(np.floor(centre[i, 1] - (s - 1) / 2 + 0.5)) + s
    crop[i] = padded[i, r0:r0 + s, c0:c0 + s]
  return FrameDigits(blobs=blobs, centre=centre, crop=crop)


def video_digit_report(frames: np.ndarray, label: int | None, classifier: DigitClassifier, *,
                       max_step_px: float = 3.0, ink_threshold: float = 0.25) -> dict:
  """The main job's three figures for one video [T, H, W] in [0, 1] conditioned on `label`:
    label_rate         frames whose digit (the largest blob, cropped around its centre) the
                       classifier reads as `label` (None: not computed)
    single_digit_rate  frames showing exactly one digit-sized blob
    steady_rate        consecutive frame pairs, both with a digit, whose centres are at most
                       max_step_px apart (pairs where either frame has no digit count as not
                       steady)
  plus the per-frame predictions and per-pair centre displacements."""
  d = frame_digits(frames, classifier.digit_size, ink_threshold=ink_threshold)
  predicted = classifier.predict(d.crop)
  predicted = np.where(d.blobs > 0, predicted, -1)
  step = np.linalg.norm(np.diff(d.centre, axis=0), axis=-1)  # nan where a frame has no digit
  steady = np.where(np.isnan(step), False, step <= max_step_px)
  return {
      "frames": int(len(d.blobs)),
      "label": None if label is None else int(label),
      "label_rate": None if label is None else float(np.mean(predicted == int(label))),
      "single_digit_rate": float(np.mean(d.blobs == 1)),
      "steady_rate": float(np.mean(steady)) if len(steady) else 1.0,
      "predicted": predicted.tolist(),
      "displacement_px": [None if np.isnan(x) else float(x) for x in step],
  }


def identity_after_gap(frames: np.ndarray, label: int, gap_end: int,
                       classifier: DigitClassifier, *, window: int = 8,
                       ink_threshold: float = 0.25) -> float:
  """Fraction of the `window` frames from `gap_end` on whose digit the classifier reads as
  `label` (the digit's identity had to come from the frames before the gap)."""
  part = np.asarray(frames, np.float32)[gap_end:gap_end + window]
  if not len(part):
    raise ValueError(f"gap_end={gap_end} is past the video's {len(frames)} frames")
  d = frame_digits(part, classifier.digit_size, ink_threshold=ink_threshold)
  predicted = np.where(d.blobs > 0, classifier.predict(d.crop), -1)
  return float(np.mean(predicted == int(label)))
