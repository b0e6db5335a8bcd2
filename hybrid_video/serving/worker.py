"""The generation worker: one background thread owns the accelerator and runs one job at a time.

  worker = GenerationWorker(runner, conditioner, max_queue=4, max_seconds=300, spool_dir=DIR)
  worker.warmup(max_frames, cond)   # compile the step for every cache capacity before serving
  worker.start()
  job = worker.new_job(request, viewer)
  worker.submit(job)                # waits in a bounded queue; QueueFull when it is full
  worker.cancel(job)                # a running job stops at the next chunk boundary
  worker.close()

A run drives the streaming core chunk by chunk (`ChunkRunner.prepare / init_carry / reserve /
generate`), so it can stop, hit the time limit, or switch the conditioning between any two chunks:
a switch recomputes the context (`runner.embed`) and applies from the next chunk on, with the
same carry. Each chunk's frames (uint8 [T, H, W, 3], batch of one) go to the job's viewer, whose
queue drops frames rather than make the model wait, and are appended to the job's spool file
(raw uint8 on disk, so a long run is not held in memory) from which "save" writes the mp4.
Viewer events: queued, started, condition, chunk, error, done (see hybrid_video/serving/app.py).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque

import jax
import numpy as np
from absl import logging

from hybrid_video.nn.model import carry_bytes
from hybrid_video.serving.conditioning import Conditioner
from hybrid_video.serving.validation import StartRequest
from hybrid_video.serving.viewer import Frame
from hybrid_video.streaming import ChunkRunner
from hybrid_video.video_io import Mp4Writer, to_uint8

_NOTHING = object()  # no pending condition switch


class QueueFull(Exception):
  """The running generation and max_queue waiting ones leave no room."""


class Job:
  """One viewer's generation: its request, progress, stop flag, pending switch and spool file."""

  def __init__(self, run: int, request: StartRequest, viewer, spool_path: str):
    self.run = run
    self.request = request
    self.viewer = viewer             # ViewerQueue (or anything with send / send_frame)
    self.spool_path = spool_path
    self.done = threading.Event()    # set when the run is over (or it was dropped from the queue)
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._stop_reason = "stopped"
    self._pending = _NOTHING
    self._discarded = False
    self.frame_shape: tuple | None = None  # (H, W, 3) once a frame exists
    self.chunks_done = 0
    self.frames_done = 0
    self.chunks_at_stop: int | None = None  # chunks done when stop was asked (Stop latency)

  def request_stop(self, reason: str = "stopped"):
    with self._lock:
      if self.chunks_at_stop is None:
        self.chunks_at_stop, self._stop_reason = self.chunks_done, reason
    self._stop.set()

  @property
  def stop_reason(self) -> str | None:
    return self._stop_reason if self._stop.is_set() else None

  def switch_condition(self, value):
    """Condition the chunks after the one in progress on `value` (a validated label/prompt)."""
    with self._lock:
      self._pending = value

  def take_condition(self):
    with self._lock:
      value, self._pending = self._pending, _NOTHING
    return value

  def record(self, frames: np.ndarray):
    """Append one chunk's frames uint8 [T, H, W, 3] to the spool."""
    with self._lock:
      if not self._discarded:
        with open(self.spool_path, "ab") as f:
          f.write(np.ascontiguousarray(frames, np.uint8).tobytes())
      self.frame_shape = tuple(frames.shape[1:])
      self.frames_done += frames.shape[0]
      self.chunks_done += 1

  def save_mp4(self, path: str, fps: int, upscale: int = 1, batch: int = 64) -> int:
    """Write the frames made so far to an mp4 at `path` (read from the spool in batches)."""
    with self._lock:
      n, shape = self.frames_done, self.frame_shape
      if self._discarded or not n:
        return 0
    per_frame = int(np.prod(shape))
    with open(self.spool_path, "rb") as f, Mp4Writer(path, fps=fps, upscale=upscale) as writer:
      for start in range(0, n, batch):
        k = min(batch, n - start)
        writer.write(np.fromfile(f, np.uint8, count=k * per_frame).reshape(k, *shape))
    return n

  def discard(self):
    """Delete the spool (the viewer left, or started another run)."""
    with self._lock:
      self._discarded = True
      if os.path.exists(self.spool_path):
        os.remove(self.spool_path)


class GenerationWorker:
  """Runs jobs one at a time on a background thread; a bounded queue holds the others."""

  def __init__(self, runner: ChunkRunner, conditioner: Conditioner, *, max_queue: int,
               spool_dir: str, max_seconds: float = 0.0):
    if runner.batch != 1:
      raise ValueError(f"runner.batch={runner.batch} must be 1 (one video per viewer)")
    if max_queue < 0:
      raise ValueError(f"{max_queue=} must be >= 0")
    self.runner = runner
    self.conditioner = conditioner
    self.max_queue = int(max_queue)
    self.max_seconds = float(max_seconds)
    self.spool_dir = spool_dir
    self._cv = threading.Condition()
    self._waiting: deque[Job] = deque()
    self._current: Job | None = None
    self._closed = False
    self._runs = 0
    self.history: deque[dict] = deque(maxlen=64)  # the "done" events of recent runs
    self._thread = threading.Thread(target=self._loop, name="generation", daemon=True)

  # -- the event loop's side ---------------------------------------------------------------------

  def start(self):
    if not self._thread.is_alive():
      self._thread.start()

  def new_job(self, request: StartRequest, viewer) -> Job:
    with self._cv:
      self._runs += 1
      run = self._runs
    return Job(run, request, viewer, os.path.join(self.spool_dir, f"run{run:06d}.u8"))

  def submit(self, job: Job) -> int:
    """Queue `job`; returns its place in the queue (0: it starts now). Raises QueueFull."""
    with self._cv:
      if self._closed:
        raise QueueFull("the server is shutting down")
      if len(self._waiting) + (self._current is not None) >= 1 + self.max_queue:
        raise QueueFull(f"the queue is full ({self.max_queue} waiting behind the running "
                        "generation); try again later")
      self._waiting.append(job)
      position = len(self._waiting) - 1 + (self._current is not None)
      self._cv.notify_all()
    if position:
      job.viewer.send({"type": "queued", "run": job.run, "position": position})
    return position

  def cancel(self, job: Job, reason: str = "stopped"):
    """Stop a running job at the next chunk boundary, or take a waiting one out of the queue."""
    with self._cv:
      waiting = job in self._waiting
      if waiting:
        self._waiting.remove(job)
        self._send_positions()
    if waiting:
      job.request_stop(reason)
      self._done(job, reason)
      job.done.set()
    else:
      job.request_stop(reason)

  @property
  def current(self) -> Job | None:
    return self._current

  @property
  def waiting(self) -> int:
    return len(self._waiting)

  def wait_idle(self, timeout: float) -> bool:
    """Block until no job runs or waits (tests, shutdown)."""
    with self._cv:
      return self._cv.wait_for(lambda: self._current is None and not self._waiting, timeout)

  def close(self, timeout: float = 30.0):
    """Stop the running job, drop the waiting ones and end the thread."""
    with self._cv:
      self._closed = True
      waiting, current = list(self._waiting), self._current
      self._cv.notify_all()
    for job in waiting:
      self.cancel(job, "server shutting down")
    if current is not None:
      current.request_stop("server shutting down")
    if self._thread.is_alive():
      self._thread.join(timeout)

  def _done(self, job: Job, reason: str, seconds: float = 0.0, model_fps: float = 0.0):
    event = {"type": "done", "run": job.run, "reason": reason, "frames": job.frames_done,
             "chunks": job.chunks_done, "chunks_at_stop": job.chunks_at_stop,
             "seconds": seconds, "model_fps": model_fps}
    self.history.append(event)
    job.viewer.send(event)

  def _send_positions(self):
    for i, job in enumerate(self._waiting):
      job.viewer.send({"type": "queued", "run": job.run,
                       "position": i + (self._current is not None)})

  # -- the worker thread ---------------------------------------------------------------------------

  def warmup(self, max_frames: int, cond=None):
    """Compile the per-chunk step for every cache capacity a max_frames video reaches (call
    before start: the first viewer should not wait for the compiler).

    Two chunks per capacity: a fresh carry and a carry the step wrote can differ in placement
    (committed or not, with parameters restored onto a device) and so in executable, though
    they trace the same; the second chunk of a stream would otherwise compile mid-stream.
    """
    runner = self.runner
    num_chunks = math.ceil(max_frames / runner.model.frames_per_chunk)
    key, context = runner.prepare(0, self.conditioner.encode(cond))
    for capacity in runner.capacities(num_chunks):
      carry = runner.init_carry(capacity)
      for _ in range(2):
        carry, frames = runner.generate(carry, key, context)
      jax.block_until_ready(frames)

  def _loop(self):
    while True:
      with self._cv:
        self._cv.wait_for(lambda: self._waiting or self._closed)
        if self._closed:
          return
        job = self._current = self._waiting.popleft()
        self._send_positions()
      try:
        self._run(job)
      except Exception as e:  # a failed run must not take the server down
        logging.exception("serve: run %d failed", job.run)
        job.viewer.send({"type": "error", "run": job.run,
                         "message": f"generation failed: {type(e).__name__}: {e}"})
        self._done(job, "error")
      finally:
        job.done.set()
        with self._cv:
          self._current = None
          self._cv.notify_all()

  def _run(self, job: Job):
    runner, req, viewer = self.runner, job.request, job.viewer
    f = runner.model.frames_per_chunk
    num_chunks = math.ceil(req.num_frames / f)
    logging.info("serve: run %d starts: %d frames, seed %d, condition %r", job.run,
                 req.num_frames, req.seed, req.cond)
    viewer.send({"type": "started", "run": job.run, "num_frames": req.num_frames,
                 "num_chunks": num_chunks, "frames_per_chunk": f, "seed": req.seed,
                 "condition": req.cond})
    start = time.perf_counter()
    model_seconds, reason = 0.0, "finished"
    key, context = runner.prepare(req.seed, self.conditioner.encode(req.cond))
    carry = runner.init_carry()
    for n in range(num_chunks):
      carry = runner.reserve(carry, n)
      # Stop, the time limit and a switch are read as late as possible before the chunk.
      if job.stop_reason is not None:
        reason = job.stop_reason
        break
      # The limit applies between chunks: the first chunk is always made, however long the
      # set-up before it took (on a loaded machine it alone can exceed a short limit).
      if self.max_seconds and n and time.perf_counter() - start > self.max_seconds:
        reason = "time limit"
        break
      value = job.take_condition()
      if value is not _NOTHING:
        context = runner.embed(self.conditioner.encode(value))
        viewer.send({"type": "condition", "run": job.run, "chunk": n, "value": value})
      t0 = time.perf_counter()
      carry, frames = runner.generate(carry, key, context)
      frames = to_uint8(np.asarray(frames)[0, :req.num_frames - n * f])  # waits for the chunk
      dt = time.perf_counter() - t0
      model_seconds += dt
      job.record(frames)
      viewer.send({"type": "chunk", "run": job.run, "chunk": n, "first_frame": n * f,
                   "frames": int(frames.shape[0]), "chunk_seconds": dt,
                   "carry_bytes": carry_bytes(carry)})
      for i, pixels in enumerate(frames):
        viewer.send_frame(Frame(job.run, n * f + i, n, pixels))
    del carry, context  # the accelerator's memory goes back before the next job starts
    seconds = time.perf_counter() - start
    logging.info("serve: run %d %s after %d frames in %.1f s", job.run, reason, job.frames_done,
                 seconds)
    self._done(job, reason, seconds, job.frames_done / max(model_seconds, 1e-9))
