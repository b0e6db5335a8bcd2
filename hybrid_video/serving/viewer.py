"""Per-viewer mailboxes from the worker thread to the event loop, and frame encoding.

The worker never waits for a viewer: `ViewerQueue.send_frame` returns at once, and when more than
`max_frames` frames wait for a slow viewer the oldest waiting frame is dropped (control events,
such as chunk statistics or "done", are never dropped). Frames are encoded (JPEG or PNG, Pillow)
on the event loop's side, so a dropped frame costs nothing.

Frames go to the page as binary WebSocket messages: a 12-byte header (run id, frame index, chunk
index; big-endian uint32) followed by the image file.
"""

from __future__ import annotations

import asyncio
import io
import struct
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

HEADER = struct.Struct(">III")
FORMATS = {"jpeg": "JPEG", "png": "PNG"}


@dataclass(frozen=True)
class Frame:
  """One generated frame: pixels uint8 [H, W, 3]."""
  run: int
  index: int
  chunk: int
  pixels: np.ndarray


def encode_frame(frame: Frame, image_format: str = "jpeg", jpeg_quality: int = 90) -> bytes:
  """Header + JPEG/PNG bytes of one frame."""
  buf = io.BytesIO()
  image = Image.fromarray(np.ascontiguousarray(frame.pixels), "RGB")
  if image_format == "jpeg":
    image.save(buf, "JPEG", quality=int(jpeg_quality))
  elif image_format == "png":
    image.save(buf, "PNG")
  else:
    raise ValueError(f"{image_format=} must be one of {', '.join(FORMATS)}")
  return HEADER.pack(frame.run, frame.index, frame.chunk) + buf.getvalue()


def decode_frame(message: bytes) -> tuple[int, int, int, np.ndarray]:
  """(run, index, chunk, pixels uint8 [H, W, 3]) of a frame message (tests, tools)."""
  run, index, chunk = HEADER.unpack_from(message)
  image = Image.open(io.BytesIO(message[HEADER.size:])).convert("RGB")
  return run, index, chunk, np.asarray(image)


class ViewerQueue:
  """Thread-safe mailbox for one viewer: `send`/`send_frame` from any thread, `get` on the loop."""

  def __init__(self, loop: asyncio.AbstractEventLoop, max_frames: int = 8):
    if max_frames <= 0:
      raise ValueError(f"{max_frames=} must be positive")
    self._loop = loop
    self._max_frames = int(max_frames)
    self._lock = threading.Lock()
    self._items: deque = deque()
    self._frames = 0            # frames among _items
    self._ready = asyncio.Event()
    self._closed = False
    self.dropped = 0            # frames dropped for this viewer so far

  def send(self, event: dict) -> None:
    """Queue a control event (never dropped)."""
    with self._lock:
      if self._closed:
        return
      self._items.append(event)
    self._wake()

  def send_frame(self, frame: Frame) -> None:
    """Queue a frame; if max_frames frames already wait, drop the oldest of them."""
    with self._lock:
      if self._closed:
        return
      if self._frames >= self._max_frames:
        for i, item in enumerate(self._items):
          if isinstance(item, Frame):
            del self._items[i]
            break
        self._frames -= 1
        self.dropped += 1
      self._items.append(frame)
      self._frames += 1
    self._wake()

  def _wake(self):
    try:
      self._loop.call_soon_threadsafe(self._ready.set)
    except RuntimeError:  # the loop is closed: the viewer is gone
      pass

  async def get(self) -> list:
    """Wait for, then take, everything queued (events and frames, in order)."""
    while True:
      await self._ready.wait()
      with self._lock:
        self._ready.clear()
        items = list(self._items)
        self._items.clear()
        self._frames = 0
      if items:
        return items

  def close(self):
    """Drop what waits and ignore later sends (the viewer disconnected)."""
    with self._lock:
      self._closed = True
      self._items.clear()
      self._frames = 0
