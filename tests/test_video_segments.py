"""Video segments: atomic segment files, pruning on resume, gaps refused, prefix links, and a
packet-copy join that decodes to the segments' frames."""

import os

import numpy as np
import pytest

from hybrid_video import video_segments as vs
from hybrid_video.errors import UserError
from hybrid_video.video_io import read_video


def _frames(n, seed=0):
  rng = np.random.default_rng(seed)
  return np.cumsum(rng.integers(0, 40, (n, 8, 8, 3)), axis=0).astype(np.uint8)


def _write(directory, start, end, frames):
  w = vs.SegmentWriter(str(directory), start, fps=8, upscale=2)
  w.write(frames)
  assert not vs.segments(str(directory)) or vs.segments(str(directory))[-1][1] <= start  # not yet
  return w.close(end)


def test_segments_join_to_their_frames_and_prune_what_a_resume_rewrites(tmp_path):
  seg = tmp_path / "segments"
  frames = _frames(11)
  bounds = [(0, 2, frames[:4]), (2, 4, frames[4:8]), (4, 6, frames[8:])]  # 2 frames per chunk
  for start, end, f in bounds:
    path = _write(seg, start, end, f)
    assert os.path.basename(path) == vs.segment_name(start, end)
  assert not os.path.exists(seg / vs.OPEN_NAME)  # every closed segment was renamed
  parts = vs.covering(str(seg), 6)
  out = str(tmp_path / "video.mp4")
  assert vs.join([p for _, _, p in parts], out) == 11
  joined = read_video(out)
  pieces = np.concatenate([read_video(p) for _, _, p in parts])
  assert joined.shape == (11, 16, 16, 3)
  np.testing.assert_array_equal(joined, pieces)  # packets copied: the same decoded pixels
  assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
  # A resume at chunk 2 removes the later segments and an unfinished one.
  (seg / vs.OPEN_NAME).write_bytes(b"\0half a segment")  # left by a killed writer
  assert sorted(vs.prune(str(seg), 2)) == sorted([vs.OPEN_NAME, vs.segment_name(2, 4),
                                                  vs.segment_name(4, 6)])
  assert [(a, b) for a, b, _ in vs.segments(str(seg))] == [(0, 2)]


def test_a_gap_is_refused_and_a_prefix_is_linked(tmp_path):
  src, dst = tmp_path / "parent", tmp_path / "fork"
  frames = _frames(8)
  _write(src, 0, 2, frames[:4])
  _write(src, 2, 4, frames[4:])
  with pytest.raises(UserError, match=r"chunks 4\.\.5 are missing"):
    vs.covering(str(src), 6)
  assert vs.copy_prefix(str(src), str(dst), 4) == 2
  for _, _, p in vs.segments(str(dst)):
    assert os.path.samefile(p, src / os.path.basename(p))
  with pytest.raises(UserError, match="not \\[0, 3\\)"):
    vs.copy_prefix(str(src), str(tmp_path / "other"), 3)  # 3 is not a segment boundary
