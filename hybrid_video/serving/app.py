"""The Starlette app of --mode=serve: one page, its assets, and one WebSocket per viewer.

  app = create_app(worker, settings)     # worker: GenerationWorker (started by the lifespan)

Routes: GET / (static/index.html), /static/* (only the files under static/), WebSocket /ws.
Hosts outside settings.allowed_hosts get 400 (a DNS-rebinding guard), and a WebSocket whose
Origin is not the page's own is refused (another site open in the browser cannot drive it).

Server -> page messages, JSON text unless noted:
  hello     {model, limits, defaults, image_format}
  queued    {run, position}              1 = next after the running generation
  refused   {message}                    the queue is full
  started   {run, num_frames, num_chunks, frames_per_chunk, seed, condition}
  condition {run, chunk, value}          a switch applied from this chunk on
  chunk     {run, chunk, first_frame, frames, chunk_seconds, carry_bytes, dropped}
  (binary)  one frame: viewer.HEADER (run, index, chunk) + a JPEG or PNG file
  done      {run, reason, frames, chunks, chunks_at_stop, seconds, model_fps, dropped}
  saved     {run, path, frames}
  error     {message}                    a bad request or a failed run; the server keeps serving
Page -> server messages: see hybrid_video/serving/validation.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from absl import logging
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import FileResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from hybrid_video.serving.conditioning import LABEL, PROMPT
from hybrid_video.serving.validation import (MAX_SEED, Limits, RequestError, parse_condition_value,
                                             parse_message, parse_start)
from hybrid_video.serving.viewer import FORMATS, Frame, ViewerQueue, encode_frame
from hybrid_video.serving.worker import GenerationWorker, Job, QueueFull

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_HEADERS = {  # the page loads nothing from elsewhere; frames arrive as blobs over the socket
    "content-security-policy": "default-src 'self'; img-src 'self' blob: data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


@dataclass(frozen=True)
class PageSettings:
  """What the app needs beyond the worker (built from config.serve by the driver)."""
  limits: Limits
  save_dir: str                          # where "save video" writes mp4 files (the run's workdir)
  image_format: str = "jpeg"             # frames on the wire: "jpeg" or "png"
  jpeg_quality: int = 90
  viewer_buffer: int = 8                 # frames held for a slow viewer before dropping the oldest
  video_fps: int = 8                     # saved mp4s
  video_upscale: int = 1
  allowed_hosts: tuple = ("127.0.0.1", "localhost")
  model: dict = field(default_factory=dict)     # shown on the page (frame size, step, ...)
  defaults: dict = field(default_factory=dict)  # initial seed / frames / label of the page

  def __post_init__(self):
    if self.image_format not in FORMATS:
      raise ValueError(f"image_format={self.image_format!r} must be one of {', '.join(FORMATS)}")
    if not 1 <= self.jpeg_quality <= 95:
      raise ValueError(f"jpeg_quality={self.jpeg_quality} must be in [1, 95]")


class _SecurityHeaders:
  """ASGI middleware: the _HEADERS on every HTTP response."""

  def __init__(self, app):
    self.app = app

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)

    async def send_with_headers(message):
      if message["type"] == "http.response.start":
        MutableHeaders(scope=message).update(_HEADERS)
      await send(message)

    return await self.app(scope, receive, send_with_headers)


class _Session:
  """One viewer's connection: its latest job and the handling of its messages."""

  def __init__(self, worker: GenerationWorker, settings: PageSettings, viewer: ViewerQueue):
    self.worker, self.settings, self.viewer = worker, settings, viewer
    self.job: Job | None = None
    self._saving = False
    self._save_task: asyncio.Task | None = None

  def _active(self) -> bool:
    return self.job is not None and not self.job.done.is_set()

  async def handle(self, raw):
    msg = parse_message(raw)
    kind = msg["type"]
    if kind == "start":
      self._start(msg)
    elif kind == "stop":
      if self._active():
        self.worker.cancel(self.job, "stopped")
    elif kind == "condition":
      value = parse_condition_value(msg, self.worker.conditioner, self.settings.limits)
      if not self._active():
        raise RequestError("no generation is running to switch")
      self.job.switch_condition(value)
    elif kind == "save":
      self._save()

  def _start(self, msg: dict):
    if self._active():
      raise RequestError("this page already has a generation running or queued; stop it first")
    request = parse_start(msg, self.worker.conditioner, self.settings.limits)
    if self.job is not None:
      self.job.discard()
    job = self.worker.new_job(request, self.viewer)
    try:
      self.worker.submit(job)
    except QueueFull as e:
      self.viewer.send({"type": "refused", "message": str(e)})
      return
    self.job = job

  def _save(self):
    """Write the run's frames so far to an mp4 in save_dir, off the event loop (Stop and the
    other messages are still handled meanwhile)."""
    job = self.job
    if job is None or not job.frames_done:
      raise RequestError("nothing to save yet: start a video first")
    if self._saving:
      raise RequestError("a save is already in progress")
    cond = job.request.cond
    tag = {LABEL: f"digit{cond}", PROMPT: "prompt"}.get(self.worker.conditioner.kind, "uncond")
    name = f"{time.strftime('%Y%m%d-%H%M%S')}_run{job.run:04d}_{tag}_seed{job.request.seed}.mp4"
    path = os.path.abspath(os.path.join(self.settings.save_dir, name))
    self._saving = True

    async def write():
      try:
        frames = await asyncio.to_thread(job.save_mp4, path, self.settings.video_fps,
                                         self.settings.video_upscale)
      except Exception as e:  # pylint: disable=broad-except  # shown on the page, logged
        logging.exception("serve: saving run %d failed", job.run)
        self.viewer.send({"type": "error", "message": f"saving failed: {e}"})
        return
      finally:
        self._saving = False
      logging.info("serve: saved %d frames of run %d to %s", frames, job.run, path)
      self.viewer.send({"type": "saved", "run": job.run, "path": path, "frames": frames})

    self._save_task = asyncio.create_task(write())  # held: a bare task may be collected

  def close(self):
    if self.job is not None:
      self.worker.cancel(self.job, "disconnected")
      self.job.discard()
    self.viewer.close()


def _same_origin(websocket: WebSocket) -> bool:
  origin = websocket.headers.get("origin")
  return origin is None or urlsplit(origin).netloc == websocket.headers.get("host")


async def _pump(websocket: WebSocket, viewer: ViewerQueue, settings: PageSettings):
  """Viewer queue -> socket. A slow socket makes the queue drop frames, never the model wait."""
  while True:
    for item in await viewer.get():
      if isinstance(item, Frame):
        data = await asyncio.to_thread(encode_frame, item, settings.image_format,
                                       settings.jpeg_quality)
        await websocket.send_bytes(data)
      else:
        if item["type"] in ("chunk", "done"):
          item = {**item, "dropped": viewer.dropped}
        await websocket.send_json(item)


def _log_failure(task: asyncio.Task):
  """A pump that died of anything but the viewer leaving is a bug: log it."""
  if not task.cancelled() and task.exception() is not None:
    e = task.exception()
    if type(e).__name__ not in ("WebSocketDisconnect", "ClientDisconnected"):
      logging.error("serve: sending to a viewer failed: %s: %s", type(e).__name__, e)


def _hello(worker: GenerationWorker, settings: PageSettings) -> dict:
  limits = settings.limits
  return {"type": "hello", "image_format": settings.image_format,
          "model": {**settings.model, "condition": worker.conditioner.describe(),
                    "frames_per_chunk": worker.runner.model.frames_per_chunk,
                    "frame_hw": list(worker.runner.frame_hw)},
          "limits": {"max_frames": limits.max_frames, "max_seconds": limits.max_frames / limits.fps,
                     "max_prompt_chars": limits.max_prompt_chars, "fps": limits.fps,
                     "max_seed": MAX_SEED},
          "defaults": settings.defaults}


def create_app(worker: GenerationWorker, settings: PageSettings) -> Starlette:
  """The app; its lifespan starts the worker thread and closes it on shutdown."""
  os.makedirs(settings.save_dir, exist_ok=True)

  async def index(request):
    return FileResponse(os.path.join(STATIC_DIR, "index.html"))

  async def stream(websocket: WebSocket):
    if not _same_origin(websocket):
      await websocket.close(code=1008)  # policy violation
      return
    await websocket.accept()
    viewer = ViewerQueue(asyncio.get_running_loop(), settings.viewer_buffer)
    session = _Session(worker, settings, viewer)
    await websocket.send_json(_hello(worker, settings))
    pump = asyncio.create_task(_pump(websocket, viewer, settings))
    pump.add_done_callback(_log_failure)
    try:
      while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
          break
        try:
          await session.handle(message.get("text", message.get("bytes")))
        except RequestError as e:
          viewer.send({"type": "error", "message": str(e)})
    finally:
      session.close()
      pump.cancel()
      with contextlib.suppress(asyncio.CancelledError, Exception):
        await pump

  @contextlib.asynccontextmanager
  async def lifespan(app):
    worker.start()
    try:
      yield
    finally:
      await asyncio.to_thread(worker.close)

  hosts = list(settings.allowed_hosts) or ["*"]
  return Starlette(
      routes=[Route("/", index), WebSocketRoute("/ws", stream),
              Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static")],
      middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts, www_redirect=False),
                  Middleware(_SecurityHeaders)],
      lifespan=lifespan)
