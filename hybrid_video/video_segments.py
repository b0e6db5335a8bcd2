"""A long video written as closed mp4 segments, joined into one mp4 when the stream ends.

  <dir>/00000000-00000016.mp4   the frames of chunks [0, 16), uint8 RGB, H.264 without B-frames
  <dir>/00000016-00000032.mp4   chunks [16, 32) ...
  <dir>/.open.mp4               the segment being written (never a finished segment's name)

A segment is encoded as its chunks arrive and renamed to its final name only once it is closed,
so a crash leaves at most the `.open.mp4` file behind, and a segment that is there is whole.
A stream checkpoint at chunk n is saved just after the segment that ends at n is closed, so the
segments ending at or before the checkpoint are exactly the video so far; a resume drops the
rest (`prune`) and writes them again. `join` copies the segments' packets into one mp4 (no
re-encoding): each segment starts with a key frame and has no B-frames, so the joined file
decodes to the same pixels as the segments, and its frames are in display order.
"""

from __future__ import annotations

import os
import re
import shutil

import av
import numpy as np

from hybrid_video.errors import UserError
from hybrid_video.video_io import Mp4Writer

_NAME = re.compile(r"^(\d{8})-(\d{8})\.mp4$")
OPEN_NAME = ".open.mp4"


def segment_name(start: int, end: int) -> str:
  return f"{start:08d}-{end:08d}.mp4"


class _SegmentMp4(Mp4Writer):
  """An Mp4Writer without B-frames: packets come in display order with pts == dts, so the
  segments' packets can be concatenated with shifted time stamps."""

  def _open_stream(self, h: int, w: int):
    super()._open_stream(h, w)
    self._stream.options = {**dict(self._stream.options or {}), "bf": "0"}


class SegmentWriter:
  """Writes the frames of chunks [start, end) to <dir>/.open.mp4; `close(end)` renames it to
  its final name. Frames are uint8 [T, H, W, 3]."""

  def __init__(self, directory: str, start: int, *, fps: int, upscale: int):
    self.directory = directory
    self.start = int(start)
    self.frames_written = 0
    os.makedirs(directory, exist_ok=True)
    self._tmp = os.path.join(directory, OPEN_NAME)
    self._writer = _SegmentMp4(self._tmp, fps=fps, upscale=upscale)

  def write(self, frames: np.ndarray):
    self._writer.write(frames)
    self.frames_written += len(frames)

  def close(self, end: int) -> str:
    """Finish the segment as chunks [start, end); returns its path."""
    self._writer.close()
    path = os.path.join(self.directory, segment_name(self.start, end))
    _fsync(self._tmp)
    os.replace(self._tmp, path)  # atomic: the segment appears whole or not at all
    return path


def _fsync(path: str):
  with open(path, "rb") as f:
    os.fsync(f.fileno())


def segments(directory: str) -> list[tuple[int, int, str]]:
  """Finished segments [(start, end, path)] sorted by start (missing folder: none)."""
  if not os.path.isdir(directory):
    return []
  out = []
  for name in os.listdir(directory):
    m = _NAME.match(name)
    if m:
      out.append((int(m.group(1)), int(m.group(2)), os.path.join(directory, name)))
  return sorted(out)


def prune(directory: str, chunk: int) -> list[str]:
  """Remove what a stream resumed at `chunk` writes again: segments ending after it and the
  unfinished `.open.mp4`. Returns the removed file names."""
  removed = []
  for start, end, path in segments(directory):
    if end > chunk:
      os.remove(path)
      removed.append(os.path.basename(path))
  tmp = os.path.join(directory, OPEN_NAME)
  if os.path.exists(tmp):
    os.remove(tmp)
    removed.append(OPEN_NAME)
  return removed


def covering(directory: str, chunk: int) -> list[tuple[int, int, str]]:
  """The segments that hold chunks [0, chunk) back to back; UserError naming the gap if any."""
  out, pos = [], 0
  for start, end, path in segments(directory):
    if end > chunk:
      break
    if start != pos:
      break
    out.append((start, end, path))
    pos = end
  if pos != chunk:
    raise UserError(f"the video segments in {directory} hold chunks [0, {pos}) back to back, "
                    f"not [0, {chunk}): chunks {pos}..{chunk - 1} are missing, so this stream "
                    "cannot be continued from its checkpoint")
  return out


def copy_prefix(source_dir: str, target_dir: str, chunk: int) -> int:
  """Copy (hard-link where possible) the segments of chunks [0, chunk) of another stream into
  `target_dir`; returns how many. The forked stream reuses the prefix instead of regenerating."""
  os.makedirs(target_dir, exist_ok=True)
  parts = covering(source_dir, chunk)
  for _, _, path in parts:
    target = os.path.join(target_dir, os.path.basename(path))
    if os.path.exists(target):
      continue
    try:
      os.link(path, target)
    except OSError:  # another file system, or no hard links
      shutil.copyfile(path, target + ".tmp")
      os.replace(target + ".tmp", target)
  return len(parts)


def join(paths: list[str], path: str) -> int:
  """Concatenate the segment mp4s at `paths` into `path` by copying packets; written to a
  temporary name and renamed, so `path` is never a half-written file. Returns the frame count."""
  tmp = os.path.join(os.path.dirname(os.path.abspath(path)), "." + os.path.basename(path) + ".tmp")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  frames = 0
  with av.open(tmp, mode="w", format="mp4") as out:
    ostream, extradata = None, None
    for seg in paths:
      with av.open(seg) as inp:
        istream = inp.streams.video[0]
        if ostream is None:
          ostream = out.add_stream_from_template(istream)
          extradata = istream.codec_context.extradata
        elif istream.codec_context.extradata != extradata:
          raise UserError(f"video segment {seg} was encoded with other settings than "
                          f"{paths[0]} (codec parameters differ); they cannot be joined")
        ticks = round(1 / (istream.average_rate * istream.time_base))  # time_base units/frame
        first, base = None, frames
        for packet in inp.demux(istream):
          if packet.dts is None:  # the demuxer's final flush packet
            continue
          first = packet.pts if first is None else first
          packet.pts = packet.dts = packet.pts - first + base * ticks
          packet.stream = ostream
          out.mux(packet)
          frames += 1
  _fsync(tmp)
  os.replace(tmp, path)
  return frames
