"""The main job's video metrics (data/digit_metrics.py) on synthetic videos with known answers:
rendered ground truth scores perfectly; blank, two-digit, shuffled and wrong-label videos score
as they should."""

from __future__ import annotations

import numpy as np
import pytest

from data import digit_metrics, moving_digits

SIZE, CANVAS, T = 12, 32, 40


@pytest.fixture(scope="module")
def classifier():
  return digit_metrics.digit_classifier(SIZE)


def _render(index: int, start=(3.0, 4.0), velocity=(1.5, -1.0), frames=T):
  images = moving_digits.digit_images_for([index], SIZE, "bilinear")
  video, _ = moving_digits.render_clip(images, np.array([start]), np.array([velocity]), frames,
                                       CANVAS, SIZE)
  return video[..., 0].astype(np.float32) / 255.0


def _train_digit(label: int) -> int:
  """A train-split source digit with this label that the classifier reads correctly."""
  _, labels, idx = moving_digits.load_digit_images("train", SIZE)
  return int(idx[np.flatnonzero(labels == label)[0]])


def test_ground_truth_scores_perfectly(classifier):
  for label in (3, 7):
    video = _render(_train_digit(label))
    r = digit_metrics.video_digit_report(video, label, classifier)
    assert r["label_rate"] == 1.0 and r["single_digit_rate"] == 1.0 and r["steady_rate"] == 1.0
    assert max(r["displacement_px"]) <= np.hypot(1.5, 1.0) + 1  # the true speed, rounded
    assert digit_metrics.video_digit_report(video, (label + 1) % 10, classifier)[
        "label_rate"] == 0.0


def test_blank_two_digit_and_shuffled_videos(classifier):
  blank = np.zeros((T, CANVAS, CANVAS), np.float32)
  r = digit_metrics.video_digit_report(blank, 3, classifier)
  assert r["label_rate"] == 0.0 and r["single_digit_rate"] == 0.0 and r["steady_rate"] == 0.0
  a = _render(_train_digit(3), start=(0.0, 0.0), velocity=(0.0, 0.0))
  b = _render(_train_digit(5), start=(20.0, 20.0), velocity=(0.0, 0.0))
  r = digit_metrics.video_digit_report(np.maximum(a, b), 3, classifier)
  assert r["single_digit_rate"] == 0.0
  # frames in random order: the digit jumps across the canvas
  fast = _render(_train_digit(4), velocity=(2.5, 2.0), frames=T)
  shuffled = fast[np.random.default_rng(0).permutation(T)]
  r = digit_metrics.video_digit_report(shuffled, 4, classifier)
  assert r["label_rate"] == 1.0 and r["single_digit_rate"] == 1.0 and r["steady_rate"] < 0.5
  # speckle (isolated pixels) is not a digit
  speckle = np.zeros((T, CANVAS, CANVAS), np.float32)
  speckle[:, ::5, ::5] = 1.0
  assert digit_metrics.video_digit_report(speckle, 3, classifier)["single_digit_rate"] == 0.0


def test_identity_after_the_gap(classifier):
  video = _render(_train_digit(6))
  video[10:20] = 0.0  # the gap: the digit is hidden
  assert digit_metrics.identity_after_gap(video, 6, 20, classifier) == 1.0
  other = video.copy()
  other[20:] = _render(_train_digit(2))[20:]  # another digit comes back
  assert digit_metrics.identity_after_gap(other, 6, 20, classifier) == 0.0
  with pytest.raises(ValueError, match="past the video"):
    digit_metrics.identity_after_gap(video, 6, T, classifier)
