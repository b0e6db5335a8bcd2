"""Tests for data/video_folder.py on tiny videos written here with PyAV."""

import logging
import os

import av
import numpy as np
import pytest

from data import DataError
from data import video_folder as vf

NUM_SRC_FRAMES = 20
SRC_FPS = 10
SRC_W, SRC_H = 64, 48


def write_video(path, codec="mpeg4", num_frames=NUM_SRC_FRAMES, fps=SRC_FPS):
  """Frame i: red channel = 12 * i everywhere, plus a moving green bar."""
  with av.open(str(path), "w") as container:
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = SRC_W, SRC_H, "yuv420p"
    for i in range(num_frames):
      img = np.zeros((SRC_H, SRC_W, 3), np.uint8)
      img[:, :, 0] = 12 * i
      img[:, 3 * i:3 * i + 8, 1] = 255
      frame = av.VideoFrame.from_ndarray(img, format="rgb24")
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  d = tmp_path_factory.mktemp("videos")
  write_video(d / "a.mp4", "mpeg4")
  (d / "sub").mkdir()
  write_video(d / "sub" / "b.mp4", "libx264")
  write_video(d / "c.webm", "libvpx")
  (d / "bad.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
  (d / "notes.txt").write_text("not a video")
  return d


def _all(source):
  return [source[i] for i in range(len(source))]


def test_clips_shapes_counts_and_corrupt_file_skipped(folder, tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    builder = vf.prepare(folder, tmp_path, num_frames=4, height=24, width=32,
                         fps=5)
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.WARNING and "bad.mp4" in r.getMessage()]
  assert warnings, caplog.text
  assert not any("a.mp4" in r.getMessage() for r in caplog.records
                 if r.name == vf.logger.name)
  assert builder.data_dir.startswith(os.path.join(str(tmp_path), "video_folder"))
  # 20 frames at 10 fps = 2 s -> 10 frames at 5 fps -> 2 clips of 4 per file.
  source = builder.as_data_source("train")
  assert len(source) == 3 * 2
  assert list(builder.info.splits.keys()) == ["train"]
  examples = _all(source)
  files = sorted({ex["file"].decode() for ex in examples})
  assert files == ["a.mp4", "c.webm", os.path.join("sub", "b.mp4")]
  assert builder.info.metadata["skipped_files"] == ["bad.mp4"]
  for ex in examples:
    assert ex["video"].shape == (4, 24, 32, 3)
    assert ex["video"].dtype == np.uint8
    assert ex["clip_index"] in (0, 1)
    assert ex["start_time"] == pytest.approx(0.8 * ex["clip_index"])
    # Timestamp resampling: target frame k (5 fps) is source frame 2k
    # (10 fps), whose red channel is 12 * 2k (codecs are lossy: tolerance).
    for m in range(4):
      k = 4 * ex["clip_index"] + m
      red = np.median(ex["video"][m, :, :, 0])
      assert abs(red - 24 * k) <= 12, (ex["file"], k, red)


def test_grayscale_stride_and_upsampled_fps(folder, tmp_path):
  builder = vf.prepare(folder, tmp_path, num_frames=6, height=16, width=16,
                       fps=20, channels=1, stride=10, recursive=False)
  # Non-recursive: a.mp4 and c.webm. 2 s at 20 fps = 40 frames -> starts
  # 0, 10, 20, 30 with 6 frames each -> 4 clips per file.
  examples = _all(builder.as_data_source("train"))
  assert len(examples) == 2 * 4
  assert {ex["file"] for ex in examples} == {b"a.mp4", b"c.webm"}
  for ex in examples:
    assert ex["video"].shape == (6, 16, 16, 1)
    # Frame rate doubled: each source frame shows twice.
    v = ex["video"].astype(int)
    assert np.abs(v[0] - v[1]).max() <= 2


def test_test_fraction_splits_by_file(folder, tmp_path):
  builder = vf.prepare(folder, tmp_path, num_frames=4, height=8, width=8,
                       fps=5, test_fraction=0.34, seed=1)
  train = _all(builder.as_data_source("train"))
  test = _all(builder.as_data_source("test"))
  train_files = {ex["file"] for ex in train}
  test_files = {ex["file"] for ex in test}
  assert len(test_files) == 1 and len(train_files) == 2
  assert not train_files & test_files
  assert len(train) + len(test) == 6


def test_short_video_skipped_with_warning(tmp_path, caplog):
  d = tmp_path / "vids"
  d.mkdir()
  write_video(d / "long.mp4")
  write_video(d / "short.mp4", num_frames=3)
  with caplog.at_level(logging.WARNING):
    builder = vf.prepare(d, tmp_path / "tfds", num_frames=8, height=8,
                         width=8, fps=10)
  assert "short.mp4" in caplog.text
  assert len(builder.as_data_source("train")) == 2  # 20 frames -> 2 clips of 8.


def test_missing_empty_and_unusable_folders_raise(tmp_path):
  missing = tmp_path / "does_not_exist"
  with pytest.raises(DataError, match=str(missing)):
    vf.prepare(missing, tmp_path / "tfds")
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "readme.txt").write_text("no videos here")
  with pytest.raises(DataError, match=str(empty)):
    vf.prepare(empty, tmp_path / "tfds")
  with pytest.raises(DataError, match=str(empty)):
    vf.make_config(empty)
  corrupt_only = tmp_path / "corrupt_only"
  corrupt_only.mkdir()
  (corrupt_only / "x.webm").write_bytes(b"\x00" * 100)
  with pytest.raises(DataError, match=str(corrupt_only)):
    vf.prepare(corrupt_only, tmp_path / "tfds")
  # The failed prepare left no dataset behind.
  assert not (tmp_path / "tfds" / "video_folder").exists() or not any(
      (tmp_path / "tfds" / "video_folder").rglob("dataset_info.json"))


def test_config_validation_and_names(folder):
  with pytest.raises(DataError):
    vf.make_config(folder, channels=2)
  with pytest.raises(DataError):
    vf.make_config(folder, fps=0)
  a = vf.make_config(folder, num_frames=4)
  assert a.name == vf.make_config(folder, num_frames=4).name
  assert a.name != vf.make_config(folder, num_frames=5).name
  assert a.name.startswith("videos")
