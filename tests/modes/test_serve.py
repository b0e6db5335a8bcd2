"""--mode=serve in-process: the Starlette app on a tiny model through Starlette's TestClient.

Frames arrive in order and match the sampler, a label switch applies at the next chunk, Stop and a
disconnect free the model within one chunk, the queue is bounded, bad inputs and failed runs get
messages while the server keeps serving, slow viewers lose frames instead of stalling the model.
A gate in the runner (`GatedSampler.reserve`, called at every chunk boundary) makes the queue
tests deterministic. One file past 400 lines on purpose: the tests share one compiled runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from configs.default import get_config
from hybrid_video import checkpoint as ckpt_lib
from hybrid_video.errors import UserError
from hybrid_video.modes import serve as serve_mode
from hybrid_video.nn.model import CausalDiT
from hybrid_video.optim import make_optimizer
from hybrid_video.serving import app as app_lib
from hybrid_video.serving import conditioning, validation
from hybrid_video.serving.viewer import Frame, ViewerQueue, decode_frame
from hybrid_video.serving.worker import GenerationWorker
from hybrid_video.streaming import StreamingSampler
from hybrid_video.train_state import init_train_state
from hybrid_video.video_io import read_video, to_uint8
from tests.helpers import tiny_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HW = (16, 16)
# Bound on every wait for the server (a message, the gate, idle): generous, since a chunk that
# compiles while the other test worker and its subprocesses hold both CI cores can take a minute.
TIMEOUT = 180.0
COMPILE = "/jax/core/compile/backend_compile_duration"


class GatedSampler(StreamingSampler):
  """A sampler whose chunk boundaries wait on `gate` (when set) and that can fail on purpose."""

  gate: threading.Semaphore | None = None
  fail_next = False

  def reserve(self, carry, chunk_index):
    if self.gate is not None:
      assert self.gate.acquire(timeout=TIMEOUT), "the test never opened the gate"
    if self.fail_next:
      self.fail_next = False
      raise RuntimeError("injected failure")
    return super().reserve(carry, chunk_index)


def random_model(cfg, seed: int = 0) -> CausalDiT:
  """A model with every parameter drawn from N(0, 0.3^2) on the host: no per-parameter
  initialiser to compile, and no zero-initialised head that would hide the labels."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalDiT(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), state)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def runner():
  """2 layers (one hybrid, one softmax with a 4-chunk window), 16x16 frames, 2 Euler steps."""
  cfg = tiny_model_config(0.5, num_layers=2)
  cfg.kv_cache.window_chunks = 4
  scfg = get_config().sampler
  scfg.num_steps = 2
  r = GatedSampler(random_model(cfg), scfg, batch=1, frame_hw=HW)
  r.warmup_done = False
  return r


@pytest.fixture
def make_app(runner, tmp_path):
  """make_app(**settings) -> (app, worker) on the shared runner, gate open."""
  runner.gate, runner.fail_next = None, False

  def make(max_queue=2, image_format="png", viewer_buffer=1000, max_frames=400, **kw):
    conditioner = conditioning.label_conditioner(10)
    worker = GenerationWorker(runner, conditioner, max_queue=max_queue,
                              spool_dir=str(tmp_path), max_seconds=kw.pop("max_seconds", 0.0))
    if not runner.warmup_done:
      worker.warmup(8, 0)
      runner.warmup_done = True
    settings = app_lib.PageSettings(
        limits=validation.Limits(max_frames=max_frames, max_prompt_chars=32, fps=8.0),
        save_dir=str(tmp_path / "serve"), image_format=image_format, viewer_buffer=viewer_buffer,
        allowed_hosts=("testserver",), **kw)
    return app_lib.create_app(worker, settings), worker

  yield make
  runner.gate = None


def recv(ws, timeout=TIMEOUT):
  """The next message ({"text"} -> dict, {"bytes"} -> (run, index, chunk, pixels)), with a
  timeout (TestClient's receive has none)."""
  box = {}

  def get():
    try:
      box["m"] = ws.receive()
    except BaseException as e:  # pylint: disable=broad-except
      box["e"] = e

  t = threading.Thread(target=get, daemon=True)
  t.start()
  t.join(timeout)
  assert box, f"no message from the server within {timeout} s"
  if "e" in box:
    raise box["e"]
  m = box["m"]
  assert m["type"] == "websocket.send", m
  if m.get("bytes") is not None:
    return decode_frame(m["bytes"])
  return json.loads(m["text"])


def until(ws, kind):
  """(events, frames) received up to and including the first event of type `kind`."""
  events, frames = [], []
  while True:
    m = recv(ws)
    if isinstance(m, tuple):
      frames.append(m)
    else:
      events.append(m)
      if m["type"] == kind:
        return events, frames


def barrier(ws):
  """Every message sent before this one has been handled (they are handled in order).
  Returns the frames received meanwhile."""
  ws.send_text("not json")
  events, frames = until(ws, "error")
  assert "JSON" in events[-1]["message"]
  return frames


@contextlib.contextmanager
def connect(client):
  """A viewer's socket, past the hello message."""
  with client.websocket_connect("/ws") as ws:
    hello = recv(ws)
    assert hello["type"] == "hello"
    yield ws


def reference_frames(runner, labels_by_chunk, seed, num_frames):
  """uint8 [T, H, W, 3] of the runner driven by hand, label switched per chunk."""
  f = runner.model.frames_per_chunk
  key, context = runner.prepare(seed, jnp.full((1, 1), labels_by_chunk[0], jnp.int32))
  carry, out = runner.init_carry(), []
  for n, label in enumerate(labels_by_chunk):
    if n and label != labels_by_chunk[n - 1]:
      context = runner.embed(jnp.full((1, 1), label, jnp.int32))
    carry, x = runner.generate(runner.reserve(carry, n), key, context)
    out.append(to_uint8(np.asarray(x)[0]))
  return np.concatenate(out)[:num_frames]


def test_frames_arrive_in_order_match_the_sampler_and_save(make_app, runner, tmp_path):
  app, worker = make_app()
  with TestClient(app) as client:
    r = client.get("/")
    assert r.status_code == 200 and "ARL2" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    with connect(client) as ws:
      ws.send_json({"type": "start", "label": 3, "seed": 5, "frames": 7})
      events, frames = until(ws, "done")
      kinds = [e["type"] for e in events]
      assert kinds == ["started"] + ["chunk"] * 4 + ["done"], kinds
      assert [i for _, i, _, _ in frames] == list(range(7))          # in order, none missing
      assert [c for _, _, c, _ in frames] == [0, 0, 1, 1, 2, 2, 3]   # 2 frames per chunk
      done = events[-1]
      assert done["frames"] == 7 and done["reason"] == "finished" and done["dropped"] == 0
      assert all(e["carry_bytes"] > 0 for e in events if e["type"] == "chunk")
      got = np.stack([p for *_, p in frames])
      np.testing.assert_array_equal(got, reference_frames(runner, [3] * 4, 5, 7))  # PNG: lossless

      ws.send_json({"type": "save"})
      saved, _ = until(ws, "saved")
      path = saved[-1]["path"]
      assert saved[-1]["frames"] == 7 and os.path.dirname(path) == str(tmp_path / "serve")
      assert read_video(path).shape[0] == 7


def test_label_switch_applies_at_the_next_chunk(make_app, runner):
  app, _ = make_app()
  runner.gate = threading.Semaphore(0)
  with TestClient(app) as client:
    with connect(client) as ws:
      ws.send_json({"type": "start", "label": 3, "seed": 1, "frames": 8})
      runner.gate.release()                    # chunk 0 only
      _, frames = until(ws, "chunk")
      ws.send_json({"type": "condition", "label": 7})
      frames += barrier(ws)
      runner.gate.release(10)
      events, more = until(ws, "done")
      switch = [e for e in events if e["type"] == "condition"]
      assert [(e["chunk"], e["value"]) for e in switch] == [(1, 7)]
      got = np.stack([p for *_, p in frames + more])
      runner.gate = None
      want = reference_frames(runner, [3, 7, 7, 7], 1, 8)
      np.testing.assert_array_equal(got, want)
      unswitched = reference_frames(runner, [3] * 4, 1, 8)
      np.testing.assert_array_equal(want[:2], unswitched[:2])
      assert np.abs(want[2:].astype(int) - unswitched[2:]).max() > 0  # the switch mattered


def test_stop_ends_the_run_within_one_chunk(make_app):
  app, worker = make_app()
  with TestClient(app) as client:
    with connect(client) as ws:
      ws.send_json({"type": "start", "label": 1, "seed": 0, "frames": 400})  # 200 chunks
      until(ws, "chunk")
      ws.send_json({"type": "stop"})
      events, _ = until(ws, "done")
      done = events[-1]
      assert done["reason"] == "stopped", done
      assert done["chunks"] - done["chunks_at_stop"] <= 1 and done["chunks"] < 200, done
      assert worker.wait_idle(TIMEOUT)


def test_the_time_limit_ends_a_run_between_chunks(make_app, runner):
  app, worker = make_app(max_seconds=0.2)
  runner.gate = threading.Semaphore(0)
  with TestClient(app) as client:
    with connect(client) as ws:
      ws.send_json({"type": "start", "label": 1, "seed": 0, "frames": 400})
      runner.gate.release()
      until(ws, "chunk")
      time.sleep(0.3)
      runner.gate.release(100)
      events, _ = until(ws, "done")
      assert events[-1]["reason"] == "time limit" and events[-1]["chunks"] == 1, events[-1]


def test_second_client_queues_third_is_refused(make_app, runner):
  app, worker = make_app(max_queue=1)
  runner.gate = threading.Semaphore(0)
  with TestClient(app) as client:
    with connect(client) as a, connect(client) as b, connect(client) as c:
      a.send_json({"type": "start", "label": 1, "seed": 0, "frames": 4})
      assert recv(a)["type"] == "started"
      b.send_json({"type": "start", "label": 2, "seed": 0, "frames": 4})
      assert recv(b) == {"type": "queued", "run": 2, "position": 1}
      c.send_json({"type": "start", "label": 3, "seed": 0, "frames": 4})
      refused = recv(c)
      assert refused["type"] == "refused" and "queue is full" in refused["message"]
      runner.gate.release(100)
      events, frames = until(a, "done")
      assert events[-1]["frames"] == 4 and len(frames) == 4
      events, frames = until(b, "done")                    # b runs once a is done
      assert events[0]["type"] == "started" and len(frames) == 4
      c.send_json({"type": "start", "label": 3, "seed": 0, "frames": 2})  # room again
      events, frames = until(c, "done")
      assert events[-1]["reason"] == "finished" and len(frames) == 2


def test_queue_positions_move_and_a_waiting_viewer_can_leave(make_app, runner):
  app, worker = make_app(max_queue=2)
  runner.gate = threading.Semaphore(0)
  with TestClient(app) as client:
    with connect(client) as a, connect(client) as b, connect(client) as c:
      a.send_json({"type": "start", "label": 1, "seed": 0, "frames": 2})
      recv(a)
      b.send_json({"type": "start", "label": 2, "seed": 0, "frames": 2})
      assert recv(b)["position"] == 1
      c.send_json({"type": "start", "label": 3, "seed": 0, "frames": 2})
      assert recv(c)["position"] == 2
      b.close()                                            # leaves the queue
      assert recv(c)["position"] == 1
      runner.gate.release(100)
      until(a, "done")
      events, frames = until(c, "done")
      assert events[0]["type"] == "started" and len(frames) == 2
      assert worker.wait_idle(TIMEOUT)
      assert [h["run"] for h in worker.history] == [2, 1, 3]  # b dropped from the queue first
      assert worker.history[0]["reason"] == "disconnected"


def test_disconnect_stops_its_generation_and_frees_the_model(make_app):
  app, worker = make_app()
  with TestClient(app) as client:
    with connect(client) as a:
      a.send_json({"type": "start", "label": 4, "seed": 0, "frames": 400})
      until(a, "chunk")
      a.close()
      assert worker.wait_idle(TIMEOUT)
      done = worker.history[-1]
      assert done["reason"] == "disconnected" and done["chunks"] - done["chunks_at_stop"] <= 1
    with connect(client) as b:                             # the model is free for the next viewer
      b.send_json({"type": "start", "label": 5, "seed": 0, "frames": 2})
      events, frames = until(b, "done")
      assert events[0]["type"] == "started" and len(frames) == 2


BAD = [
    ("[1, 2]", "JSON objects"),
    ('{"type": "launch"}', "type='launch'"),
    ('{"type": "start", "label": 1, "seed": 0, "frames": 4, "path": "/etc/passwd"}', "'path'"),
    ('{"type": "start", "label": 10, "seed": 0, "frames": 4}', "label=10 must be"),
    ('{"type": "start", "label": "3", "seed": 0, "frames": 4}', "label='3' must be"),
    ('{"type": "start", "label": true, "seed": 0, "frames": 4}', "label=True must be"),
    ('{"type": "start", "prompt": "a cat", "seed": 0, "frames": 4}', "not 'prompt'"),
    ('{"type": "start", "label": 1, "seed": -1, "frames": 4}', "seed=-1 must be"),
    ('{"type": "start", "label": 1, "seed": 0, "frames": 0}', "frames=0 must be"),
    ('{"type": "start", "label": 1, "seed": 0, "frames": 401}', "frames=401 must be"),
    ('{"type": "start", "label": 1, "seed": 0, "frames": 1.5}', "frames=1.5 must be"),
    ('{"type": "start", "label": 1, "seed": 0}', "exactly one of frames or seconds"),
    ('{"type": "start", "label": 1, "seed": 0, "seconds": 51}', "seconds=51 must be"),
    ('{"type": "start", "label": 1, "seed": 0, "seconds": NaN}', "seconds=nan must be"),
    ('{"type": "condition", "label": 2}', "no generation is running"),
    ('{"type": "save"}', "nothing to save"),
    ("x" * 5000, "at most 4096"),
]


def test_bad_inputs_get_messages_and_the_server_keeps_serving(make_app):
  app, worker = make_app()
  with TestClient(app) as client:
    assert client.get("/static/app.js").status_code == 200
    for path in ("/static/%2e%2e/app.py", "/static/../../main.py", "/main.py", "/etc/passwd"):
      assert client.get(path).status_code == 404, path
    assert client.get("/", headers={"host": "evil.example"}).status_code == 400
    with pytest.raises(WebSocketDisconnect):  # another site's page may not drive the socket
      with client.websocket_connect("/ws", headers={"origin": "http://evil.example"}):
        pass
    with connect(client) as ws:
      for text, fragment in BAD:
        ws.send_text(text)
        m = recv(ws)
        assert m["type"] == "error" and fragment in m["message"], (text, m)
      ws.send_bytes(b"\x00\x01")
      assert "JSON text" in recv(ws)["message"]
      ws.send_json({"type": "start", "label": 1, "seed": 0, "seconds": 0.5})  # 4 frames at 8 fps
      events, frames = until(ws, "done")
      assert events[-1]["reason"] == "finished" and len(frames) == 4


def test_a_failed_generation_is_shown_logged_and_the_server_keeps_running(make_app, runner,
                                                                          caplog):
  app, _ = make_app()
  with TestClient(app) as client:
    with connect(client) as ws:
      runner.fail_next = True
      with caplog.at_level(logging.ERROR):
        ws.send_json({"type": "start", "label": 1, "seed": 0, "frames": 4})
        events, _ = until(ws, "done")
      error = next(e for e in events if e["type"] == "error")
      assert "injected failure" in error["message"] and events[-1]["reason"] == "error"
      assert "run 1 failed" in caplog.text
      ws.send_json({"type": "start", "label": 1, "seed": 0, "frames": 4})
      events, frames = until(ws, "done")
      assert events[-1]["reason"] == "finished" and len(frames) == 4


def test_slow_viewers_lose_the_oldest_frames_never_events_and_the_model_never_waits(runner,
                                                                                    tmp_path):
  runner.gate = None
  loop = asyncio.new_event_loop()  # never run: a viewer that reads nothing
  try:
    viewer = ViewerQueue(loop, max_frames=3)
    worker = GenerationWorker(runner, conditioning.label_conditioner(10), max_queue=0,
                              spool_dir=str(tmp_path))
    worker.start()
    job = worker.new_job(validation.StartRequest(2, 0, 20), viewer)
    worker.submit(job)
    assert job.done.wait(TIMEOUT) and worker.history[-1]["frames"] == 20
    worker.close()
    items = loop.run_until_complete(viewer.get())
  finally:
    loop.close()
  frames = [i for i in items if isinstance(i, Frame)]
  events = [i["type"] for i in items if not isinstance(i, Frame)]
  assert [f.index for f in frames] == [17, 18, 19] and viewer.dropped == 17
  assert events == ["started"] + ["chunk"] * 10 + ["done"]


def test_prompt_conditioner_hook_and_prompt_validation():
  seen = []
  cond = conditioning.prompt_conditioner(lambda p: seen.append(p) or np.ones((3, 4)))
  assert cond.encode("a cat").shape == (1, 3, 4) and seen == ["a cat"]
  limits = validation.Limits(max_frames=10, max_prompt_chars=8, fps=8.0)
  msg = validation.parse_message('{"type": "start", "prompt": "a dog", "seed": 1, "frames": 3}')
  assert validation.parse_start(msg, cond, limits) == validation.StartRequest("a dog", 1, 3)
  for prompt, fragment in [("a" * 9, "at most 8"), ("  ", "non-empty"), ("a\x00b", "control")]:
    with pytest.raises(validation.RequestError, match=fragment):
      validation.parse_condition_value({"type": "condition", "prompt": prompt}, cond, limits)
  with pytest.raises(UserError, match="not wired"):
    conditioning.conditioner_for(tiny_model_config(cond="embeddings"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """An untrained smoke-config checkpoint saved the way the trainer saves it."""
  workdir = str(tmp_path_factory.mktemp("serve_ckpt"))
  cfg = get_config("smoke")
  cfg.data.dir = str(tmp_path_factory.mktemp("tfds"))
  state = init_train_state(random_model(cfg.model), make_optimizer(cfg.train))
  ck = ckpt_lib.Checkpointer(workdir)
  ck.save(3, state, cfg, force=True)
  ck.wait()
  ck.close()
  return workdir, cfg.data.dir


@pytest.mark.slow
def test_driver_serves_a_checkpoint(checkpoint, tmp_path):
  workdir, data_dir = checkpoint
  cfg = get_config("smoke")  # the checkpoint's own config defines the model
  cfg.data.dir = data_dir
  cfg.serve.max_frames = 6
  cfg.sampler.num_steps = 2
  cfg.serve.allowed_hosts = ("testserver",)
  assert cfg.serve.host == "127.0.0.1"  # loopback unless configured
  app, worker, config = serve_mode.build_server(cfg, workdir, str(tmp_path))
  compiles = []
  listener = lambda event, seconds, **kw: compiles.append(event) if event == COMPILE else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
      hello = recv(ws)
      assert hello["model"]["step"] == 3 and hello["model"]["frame_hw"] == [16, 16]
      assert hello["model"]["condition"] == {"kind": "label", "num_classes": 10}
      ws.send_json({"type": "start", "label": 0, "seed": 0, "frames": 5})
      events, frames = until(ws, "done")
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert [i for _, i, _, _ in frames] == list(range(5)) and frames[0][3].shape == (16, 16, 3)
  # Warmed up before serving: no chunk of the request compiles (restored parameters are
  # committed to a device, so chunk 1's carry is too, unlike chunk 0's fresh one).
  assert compiles == []
  cfg.serve.port = 70000
  with pytest.raises(UserError, match="serve.port=70000"):
    serve_mode.build_server(cfg, workdir, str(tmp_path))


def test_main_dispatches_serve_with_one_line_errors(tmp_path):
  r = subprocess.run([sys.executable, "main.py", "--mode=serve", f"--workdir={tmp_path}",
                      "--config.serve.image_format=gif"], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 1 and r.stderr.strip().splitlines() == [
      "error: serve.image_format='gif' must be 'jpeg' or 'png'"], r.stderr


def test_the_time_limit_never_ends_a_run_before_its_first_chunk(make_app, runner):
  """A set-up slower than the limit (a loaded machine) still makes the first chunk."""
  app, worker = make_app(max_seconds=1e-6)
  with TestClient(app) as client:
    with connect(client) as ws:
      ws.send_json({"type": "start", "label": 1, "seed": 0, "frames": 400})
      events, frames = until(ws, "done")
      assert events[-1]["reason"] == "time limit" and events[-1]["chunks"] == 1, events[-1]
      assert any(e["type"] == "chunk" for e in events)
