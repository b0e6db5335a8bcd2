"""--mode=serve: a local page where a viewer starts a video and watches it arrive chunk by chunk.

  python main.py --mode=serve --workdir=DIR [--config.serve.port=8000]
                 [--config.train.resume_step=STEP]   # which checkpoint (default: latest)

Loads the workdir's checkpoint as --mode=sample does (its own config defines the model), compiles
the sampler step for every cache capacity up to serve.max_frames, and serves
http://serve.host:serve.port/ with uvicorn until Ctrl-C. One generation runs at a time; others
wait in a queue of serve.max_queue. "Save video" writes DIR/serve/*.mp4. The page and the
protocol: hybrid_video/serving/.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile

import uvicorn
from absl import logging

from hybrid_video import inputs as inputs_lib
from hybrid_video.errors import UserError
from hybrid_video.restore import load_model
from hybrid_video.serving import app as app_lib
from hybrid_video.serving.conditioning import LABEL, conditioner_for
from hybrid_video.serving.validation import Limits
from hybrid_video.serving.worker import GenerationWorker
from hybrid_video.streaming import StreamingSampler

WS_MAX_BYTES = 64 * 1024  # client messages are small JSON; anything bigger is refused by uvicorn


def _is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def check_serve_config(scfg) -> None:
  """One-line errors for a bad serve section (before the model is loaded)."""
  if not 0 <= int(scfg.port) <= 65535:
    raise UserError(f"serve.port={scfg.port} must be in [0, 65535]")
  if int(scfg.max_queue) < 0:
    raise UserError(f"serve.max_queue={scfg.max_queue} must be >= 0")
  if float(scfg.max_seconds) < 0:
    raise UserError(f"serve.max_seconds={scfg.max_seconds} must be >= 0 (0 = no limit)")
  if int(scfg.viewer_buffer) <= 0:
    raise UserError(f"serve.viewer_buffer={scfg.viewer_buffer} must be positive")
  if scfg.image_format not in ("jpeg", "png"):
    raise UserError(f"serve.image_format={scfg.image_format!r} must be 'jpeg' or 'png'")
  if not 1 <= int(scfg.jpeg_quality) <= 95:
    raise UserError(f"serve.jpeg_quality={scfg.jpeg_quality} must be in [1, 95]")
  Limits.from_config(scfg)


def build_server(config, workdir: str, spool_dir: str, *, overrides=None):
  """(app, worker, config): the model from `workdir`'s checkpoint behind the streaming page.

  The worker is not started (the app's lifespan starts it); spool_dir holds the runs' frames
  until they are saved or discarded. overrides: the command line's --config values (main.py).
  """
  check_serve_config(config.serve)
  scfg = config.serve
  model, config, step = load_model(config, workdir, config.train.resume_step,
                                   cli_overrides=overrides)
  conditioner = conditioner_for(config.model)
  runner = StreamingSampler(model, config.sampler, batch=1, frame_hw=inputs_lib.frame_hw(config))
  worker = GenerationWorker(runner, conditioner, max_queue=int(scfg.max_queue),
                            spool_dir=spool_dir, max_seconds=float(scfg.max_seconds))
  limits = Limits.from_config(scfg)
  if scfg.warmup:
    print(f"serve: compiling the sampler step (up to {limits.max_frames} frames)...", flush=True)
    worker.warmup(limits.max_frames, 0 if conditioner.kind == LABEL else None)
  defaults = {"seed": int(config.sampler.seed),
              "frames": min(int(config.sampler.num_frames), limits.max_frames)}
  if conditioner.kind == LABEL:
    defaults["label"] = 0
  settings = app_lib.PageSettings(
      limits=limits, save_dir=os.path.join(os.path.abspath(workdir), "serve"),
      image_format=scfg.image_format, jpeg_quality=int(scfg.jpeg_quality),
      viewer_buffer=int(scfg.viewer_buffer), video_fps=int(round(limits.fps)),
      video_upscale=int(config.video_upscale), allowed_hosts=tuple(scfg.allowed_hosts),
      model={"step": step, "name": os.path.basename(os.path.abspath(workdir))},
      defaults=defaults)
  return app_lib.create_app(worker, settings), worker, config


def serve_main(config, workdir: str, *, overrides=None) -> None:
  """Serve the page until interrupted."""
  scfg = config.serve
  with tempfile.TemporaryDirectory(prefix="arl2-serve-") as spool_dir:
    app, _, _ = build_server(config, workdir, spool_dir, overrides=overrides)
    if not _is_loopback(scfg.host):
      logging.warning("serve: listening on %s: anyone who can reach it can run the model "
                      "(there is no login)", scfg.host)
    host = f"[{scfg.host}]" if ":" in scfg.host else scfg.host  # an IPv6 address
    print(f"serve: http://{host}:{scfg.port}/  (Ctrl-C stops)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=scfg.host, port=int(scfg.port),
                                           log_level="info", access_log=False,
                                           ws_max_size=WS_MAX_BYTES, lifespan="on"))
    try:
      server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its clean shutdown
      pass
    print("serve: stopped", flush=True)
