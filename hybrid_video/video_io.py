"""Streaming mp4 output with PyAV: frames are encoded as they arrive, never held whole."""

from __future__ import annotations

import os

import av
import numpy as np


def to_uint8(frames: np.ndarray) -> np.ndarray:
  """Model frames in [-1, 1], [..., H, W, C] -> uint8 RGB [..., H, W, 3]."""
  x = np.clip((np.asarray(frames, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  return x


def to_unit(frames: np.ndarray) -> np.ndarray:
  """Model frames in [-1, 1] -> float32 in [0, 1] (clipped), the digit metrics' input."""
  return np.clip((np.asarray(frames, np.float32) + 1.0) / 2.0, 0.0, 1.0)


class Mp4Writer:
  """Writes [H, W, 3] uint8 frames to an H.264 mp4, optionally upscaled by an integer factor.

  Frame sizes are padded to even numbers (yuv420p needs them). Encoding is causal
  (x264 `zerolatency`: no B-frames, no lookahead), so each frame's pixels depend only on the
  frames before it: a stream that diverges at frame k (a prompt switch, a fork) decodes to the
  same pixels before k, and frames can be flushed as they arrive.
  """

  def __init__(self, path: str, fps: int = 8, upscale: int = 1):
    self.path = path
    self.fps = int(fps)
    self.upscale = int(upscale)
    self.frames_written = 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._container = av.open(path, mode="w")
    self._stream = None

  def _open_stream(self, h: int, w: int):
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    self._stream = self._container.add_stream(codec, rate=self.fps)
    self._stream.width, self._stream.height = w + w % 2, h + h % 2
    self._stream.pix_fmt = "yuv420p"
    if codec == "libx264":
      self._stream.options = {"crf": "18", "preset": "veryfast", "tune": "zerolatency"}

  def write(self, frames: np.ndarray):
    """frames uint8 [T, H, W, 3]."""
    for frame in frames:
      if self.upscale > 1:
        frame = frame.repeat(self.upscale, axis=0).repeat(self.upscale, axis=1)
      h, w = frame.shape[:2]
      if self._stream is None:
        self._open_stream(h, w)
      frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
      packet = self._stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame),
                                                              format="rgb24"))
      self._container.mux(packet)
      self.frames_written += 1

  def close(self):
    if self._stream is not None:
      self._container.mux(self._stream.encode(None))
    self._container.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_video(path: str) -> np.ndarray:
  """Decode a video to uint8 RGB [T, H, W, 3] (used by tests and evaluation)."""
  with av.open(path) as container:
    return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
