"""Tests for data/moving_digits.py (tiny configs; offline)."""

import os

import numpy as np
import pytest

from data import DataError
from data import digit_metrics
from data import moving_digits as md


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  return md.prepare("tiny", data_dir)


def _all(source):
  return [source[i] for i in range(len(source))]


def _small_config(**kw):
  settings = dict(canvas_size=16, digit_size=6, num_digits=2, num_frames=3,
                  num_train=6, num_test=3, seed=7)
  settings.update(kw)
  return md.make_config(base="tiny", **settings)


def test_tiny_layout_shapes_dtypes_and_ranges(tiny):
  cfg = md.CONFIGS["tiny"]
  assert tiny.data_dir.endswith(os.path.join("moving_digits", "tiny", "1.0.0"))
  assert sorted(tiny.info.splits.keys()) == ["test", "train"]
  _, all_labels = md._raw_digits()
  span = cfg.canvas_size - cfg.digit_size
  for split, n in (("train", cfg.num_train), ("test", cfg.num_test)):
    source = tiny.as_data_source(split)
    assert len(source) == n
    for ex in _all(source):
      t, s, k = cfg.num_frames, cfg.canvas_size, cfg.num_digits
      expected = {
          "video": ((t, s, s, 1), np.uint8),
          "labels": ((k,), np.int64),
          "positions": ((t, k, 2), np.float32),
          "source_index": ((k,), np.int64),
          "start": ((k, 2), np.float32),
          "velocity": ((k, 2), np.float32),
      }
      assert set(ex) == set(expected)
      for key, (shape, dtype) in expected.items():
        assert ex[key].shape == shape, key
        assert ex[key].dtype == dtype, key
      assert ((0 <= ex["labels"]) & (ex["labels"] <= 9)).all()
      np.testing.assert_array_equal(ex["labels"], all_labels[ex["source_index"]])
      assert ex["video"].max() > 0
      assert (ex["positions"] >= 0).all() and (ex["positions"] <= span).all()
      speed = np.linalg.norm(ex["velocity"], axis=-1)
      assert ((speed >= cfg.speed_min - 1e-5) & (speed <= cfg.speed_max + 1e-5)).all()


def test_train_test_source_digits_are_disjoint(tiny):
  train_pool = md.split_source_indices("train")
  test_pool = md.split_source_indices("test")
  assert not set(train_pool) & set(test_pool)
  assert len(train_pool) + len(test_pool) == md.NUM_SOURCE_DIGITS
  assert 0.15 < len(test_pool) / md.NUM_SOURCE_DIGITS < 0.25
  used = {}
  for split in ("train", "test"):
    used[split] = {int(i) for ex in _all(tiny.as_data_source(split))
                   for i in ex["source_index"]}
  assert used["train"] <= set(train_pool.tolist())
  assert used["test"] <= set(test_pool.tolist())
  assert not used["train"] & used["test"]

  images, labels, idx = md.load_digit_images("test", digit_size=10)
  assert images.shape == (len(test_pool), 10, 10) and images.dtype == np.uint8
  np.testing.assert_array_equal(idx, test_pool)
  assert set(labels.tolist()) == set(range(10))


def test_render_clip_reproduces_stored_clips_and_extends_them(tiny):
  cfg = md.CONFIGS["tiny"]
  t = cfg.num_frames
  for split in ("train", "test"):
    source = tiny.as_data_source(split)
    for i in range(0, len(source), 5):
      ex = source[i]
      images = md.digit_images_for(ex["source_index"], cfg.digit_size)
      video, pos = md.render_clip(images, ex["start"], ex["velocity"], 5 * t,
                                  cfg.canvas_size, cfg.digit_size)
      assert video.shape == (5 * t, cfg.canvas_size, cfg.canvas_size, 1)
      np.testing.assert_array_equal(video[:t], ex["video"])
      np.testing.assert_array_equal(pos[:t], ex["positions"])
      # Same through the example-level helper.
      video2, pos2 = md.regenerate_clip(ex, 5 * t, "tiny")
      np.testing.assert_array_equal(video2, video)
      np.testing.assert_array_equal(pos2, pos)
      # Extended frames: one digit, drawn at the rounded position.
      pix = md.pixel_positions(pos, cfg.canvas_size, cfg.digit_size)
      for f in range(5 * t):
        y, x = pix[f, 0]
        expected = np.zeros((cfg.canvas_size,) * 2, np.uint8)
        expected[y:y + cfg.digit_size, x:x + cfg.digit_size] = images[0]
        np.testing.assert_array_equal(video[f, :, :, 0], expected)
      # Moves at most |v| per frame (reflection only shortens the step).
      step = np.abs(np.diff(pos, axis=0)).max(axis=0)
      assert (step <= np.abs(ex["velocity"]) + 1e-4).all()


def test_bounce_positions_reflect_off_walls():
  # canvas 10, digit 4 -> top-left moves in [0, 6].
  pos = md.bounce_positions([[0.0, 6.0]], [[3.0, -2.0]], 7, 10, 4)
  np.testing.assert_allclose(pos[:, 0, 0], [0, 3, 6, 3, 0, 3, 6])
  np.testing.assert_allclose(pos[:, 0, 1], [6, 4, 2, 0, 2, 4, 6])
  assert pos.dtype == np.float32
  # Digit as large as the canvas: never moves.
  assert not md.bounce_positions([[0.0, 0.0]], [[1.0, 1.0]], 3, 8, 8).any()


def test_upsampling_nearest_and_bilinear():
  raw = np.arange(64).reshape(1, 8, 8) % 17
  same = md.upsample_digits(raw, 8, "nearest")
  np.testing.assert_array_equal(same, (raw * 255 * 2 + 16) // 32)
  double = md.upsample_digits(raw, 16, "nearest")
  np.testing.assert_array_equal(double, np.repeat(np.repeat(same, 2, 1), 2, 2))
  bil = md.upsample_digits(raw, 12, "bilinear")
  assert bil.shape == (1, 12, 12) and bil.dtype == np.uint8
  np.testing.assert_array_equal(md.upsample_digits(raw, 8, "bilinear"), same)
  assert bil.min() >= same.min() and bil.max() <= same.max()


def test_same_seed_identical_different_seed_different(tmp_path):
  cfg = _small_config(name="seed7")
  a = md.prepare(cfg, tmp_path / "a")
  b = md.prepare(_small_config(name="seed7"), tmp_path / "b")
  c = md.prepare(_small_config(name="seed8", seed=8), tmp_path / "a")
  assert a.data_dir != c.data_dir  # Different config name -> own dir.
  ex_a, ex_b, ex_c = (_all(x.as_data_source("train")) for x in (a, b, c))
  assert ex_a[0]["video"].shape == (3, 16, 16, 1)
  assert ex_a[0]["labels"].shape == (2,)
  assert ex_a[0]["positions"].shape == (3, 2, 2)
  for ea, eb in zip(ex_a, ex_b):
    for key in ea:
      np.testing.assert_array_equal(ea[key], eb[key])
  assert not all(np.array_equal(ea["video"], ec["video"])
                 for ea, ec in zip(ex_a, ex_c))
  # In-memory generation is deterministic too.
  g1 = md.generate_example(cfg, "test", 2)
  g2 = md.generate_example(cfg, "test", 2)
  for key in g1:
    np.testing.assert_array_equal(g1[key], g2[key])


def test_prepare_reuses_data_and_rejects_changed_settings(tmp_path):
  b1 = md.prepare(_small_config(name="mine"), tmp_path)
  record = [f for f in os.listdir(b1.data_dir) if "train.array_record" in f][0]
  mtime = os.path.getmtime(os.path.join(b1.data_dir, record))
  b2 = md.prepare(_small_config(name="mine"), tmp_path)
  assert os.path.getmtime(os.path.join(b2.data_dir, record)) == mtime
  with pytest.raises(DataError, match="other settings|not"):
    md.prepare(_small_config(name="mine", seed=99), tmp_path)


def test_prepare_errors(tmp_path):
  not_a_dir = tmp_path / "file"
  not_a_dir.write_text("x")
  with pytest.raises(DataError, match="not"):
    md.prepare("tiny", not_a_dir)
  with pytest.raises(DataError, match="not writable"):
    md.prepare("tiny", not_a_dir / "sub")
  with pytest.raises(DataError, match="unknown"):
    md.prepare("nope", tmp_path)
  with pytest.raises(DataError, match="built-in"):
    md.make_config(name="tiny", num_frames=99)
  with pytest.raises(DataError):
    md.make_config(digit_size=40)  # Larger than the canvas.
  if os.geteuid() != 0:  # root ignores permissions
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
      with pytest.raises(DataError, match="not writable"):
        md.prepare("tiny", ro)
    finally:
      ro.chmod(0o700)


def test_named_configs():
  assert {"default", "tiny", "two_digits"} <= set(md.CONFIGS)
  d = md.CONFIGS["default"]
  assert (d.canvas_size, d.num_digits, d.num_frames) == (32, 1, 8)
  assert (d.num_train, d.num_test) == (2000, 200)
  assert md.CONFIGS["two_digits"].num_digits == 2
  custom = md.make_config(num_frames=5)
  assert custom.name.startswith("custom_")
  assert md.make_config(num_frames=5).name == custom.name
  assert md.make_config(num_frames=6).name != custom.name


def test_exit_margin_extends_the_horizontal_track_only():
  # canvas 10, digit 4, margin 3 -> x moves in [-3, 9], y still in [0, 6].
  pos = md.bounce_positions([[0.0, 6.0]], [[3.0, 4.0]], 6, 10, 4, exit_margin=3)
  np.testing.assert_allclose(pos[:, 0, 0], [0, 3, 6, 3, 0, 3])
  np.testing.assert_allclose(pos[:, 0, 1], [6, 8, 4, 0, -2, 2])  # reflected at 9 and at -3
  np.testing.assert_allclose(md.bounce_positions([[0.0, 6.0]], [[3.0, -2.0]], 7, 10, 4,
                                                 exit_margin=0),
                             md.bounce_positions([[0.0, 6.0]], [[3.0, -2.0]], 7, 10, 4))
  # The settings of configs without a margin (their data dirs and custom names) are unchanged.
  assert "exit_margin" not in md.CONFIGS["default"].settings()
  assert md.CONFIGS["exits"].settings()["exit_margin"] == 20
  with pytest.raises(DataError, match="exit_margin"):
    md.make_config(base="tiny", exit_margin=-1)


def test_exits_digits_leave_the_canvas_for_chunks_and_come_back():
  cfg = md.get_config("exits")
  s, c, m = cfg.digit_size, cfg.canvas_size, cfg.exit_margin
  for i in range(12):
    ex = md.generate_example(cfg, "train", i)
    video, pos = md.regenerate_clip(ex, cfg.num_frames, cfg)
    np.testing.assert_array_equal(video, ex["video"])
    top = md.pixel_positions(pos, c, s, m)[:, 0]  # [T, 2]
    assert (top[:, 0] >= 0).all() and (top[:, 0] <= c - s).all()
    assert (top[:, 1] >= -m).all() and (top[:, 1] <= c - s + m).all()
    assert md.fully_visible(top[0], c, s)  # the context frames show the digit
    off = (top[:, 1] <= -s) | (top[:, 1] >= c)
    assert off.sum() >= 4, (i, top[:, 1])  # wholly off for at least 2 chunks of 2 frames
    assert not video[off].any()  # nothing of it is drawn then
    end = int(md.gap_ends(top[None, :, None], c, s)[0, 0])
    assert end > np.argmax(off) and md.fully_visible(top[end], c, s)
    image = md.digit_images_for(ex["source_index"], s, cfg.interpolation)[0]
    y, x = top[end]
    np.testing.assert_array_equal(video[end, y:y + s, x:x + s, 0], image)
    partly = ~off & ~md.fully_visible(top, c, s)  # cut at the canvas edge
    for t in np.flatnonzero(partly):
      y, x = top[t]
      x0, x1 = max(x, 0), min(x + s, c)
      np.testing.assert_array_equal(video[t, y:y + s, x0:x1, 0], image[:, x0 - x:x1 - x])


def test_ground_truth_of_exits_clips_says_when_each_digit_is_on_the_canvas():
  cfg = md.get_config("exits")
  source = [md.generate_example(cfg, "test", i) for i in range(4)]
  gt = digit_metrics.ground_truth(source, cfg, 4, 60)  # longer than the 40-frame clips
  s, c = cfg.digit_size, cfg.canvas_size
  assert gt.video.shape[:2] == (4, 60) and gt.visible.shape == (4, 60, 1)
  np.testing.assert_array_equal(gt.video[:, :cfg.num_frames], np.stack([e["video"]
                                                                        for e in source]))
  assert (gt.top_left[..., 1] < 0).any()  # true positions, off the canvas too
  np.testing.assert_array_equal(gt.visible, md.fully_visible(gt.top_left, c, s))
  np.testing.assert_array_equal(gt.gap_end, md.gap_ends(gt.top_left, c, s))
  assert (gt.gap_end > 0).all()
  for v in range(4):
    y, x = gt.top_left[v, gt.gap_end[v, 0], 0]
    np.testing.assert_array_equal(gt.video[v, gt.gap_end[v, 0], y:y + s, x:x + s, 0],
                                  np.round(gt.templates[v, 0] * 255))
  plain = digit_metrics.ground_truth([md.generate_example(md.get_config("default"), "test", 0)],
                                     md.get_config("default"), 1, 8)
  assert plain.visible is None and plain.gap_end is None
