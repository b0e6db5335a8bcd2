"""ARL2 command line: python main.py --config=configs/default.py[:variant] --workdir=DIR --mode=MODE.

Modes: train (then stream a long video: the main job), sample (resumable streams; text to
video for configs/wan.py), convert (softmax teacher -> ARL2 hybrid, configs/convert.py),
benchmark (per-chunk time and memory of each attention policy, configs/benchmark.py), eval
(long-horizon continuation metrics of checkpoints), compile (lower + compile the train and
sampler steps for the mesh; print memory and FLOPs), import (released Wan / Causal-Forcing /
ARL2 weights -> a checkpoint, configs/wan.py), serve (a local page that streams a video),
encode / decode (videos -> VAE latent clips, latents -> mp4; configs/wan.py).
User errors (bad config, flags, data, checkpoints, a non-finite loss) print one line and exit 1.
"""

import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.stderr.flush()
  sys.stdout.flush()
  # os._exit: the checkpoint library's background threads would otherwise print "Event loop is
  # closed" tracebacks at interpreter exit. Every save has finished by now (the training loop
  # waits for saves in flight before an error propagates).
  os._exit(1)


def _unknown_field(e: Exception, argv) -> str:
  key = str(e).strip("\"'")
  where = [a for a in argv[1:] if a.startswith("--config.") and key in a.split("=")[0]]
  return f"unknown config field {key!r}" + (f" in {where[0]}" if where else "")


try:  # with the default --config, overrides are applied here, at definition time
  config_flags.DEFINE_config_file("config", "configs/default.py",
                                  "Experiment config file[:variant].", lock_config=True)
except (AttributeError, KeyError) as e:
  _fail(_unknown_field(e, sys.argv))
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and videos.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "convert", "benchmark", "eval",
                                   "compile", "serve", "import", "encode", "decode"],
                  "What to run (see MODES).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize (multi-host). With no "
                  "coordinator flags, JAX reads the cluster from the environment (TPU pods, "
                  "SLURM, Open MPI).")
flags.DEFINE_string("coordinator_address", None, "--distributed: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "--distributed: number of processes.")
flags.DEFINE_integer("process_id", None, "--distributed: index of this process.")
flags.mark_flags_as_required(["workdir"])


# --mode -> (driver module, function): imported on dispatch, so `--help` and flag errors stay fast.
MODES = {
    "train": ("hybrid_video.modes.train", "train_main"),
    "sample": ("hybrid_video.modes.sample", "sample_main"),
    "convert": ("hybrid_video.modes.convert", "convert_main"),
    "benchmark": ("hybrid_video.modes.benchmark", "benchmark_main"),
    "eval": ("hybrid_video.modes.evaluate", "evaluate_main"),
    "compile": ("hybrid_video.modes.compile", "compile_main"),
    "serve": ("hybrid_video.modes.serve", "serve_main"),
    "import": ("hybrid_video.modes.import_weights", "import_main"),
    "encode": ("hybrid_video.modes.codec", "encode_main"),
    "decode": ("hybrid_video.modes.codec", "decode_main"),
}


def run(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS["verbosity"].present:  # keep library INFO chatter (orbax, tfds) out of the way
    logging.set_verbosity(logging.WARNING)
  from hybrid_video import config_checks  # pylint: disable=g-import-not-at-top
  config = _load_config()
  config_checks.check_config(config)
  config_checks.check_workdir(FLAGS.workdir)
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.distributed:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.info("JAX %s, %d process(es), devices: %s", jax.__version__, jax.process_count(),
               jax.devices())
  module, function = MODES[FLAGS.mode]
  # Fields given on the command line: drivers that take a checkpoint's own model config apply
  # the ones a checkpoint allows and refuse the rest (instead of ignoring them silently).
  overrides = dict(config_flags.get_override_values(FLAGS["config"]))
  getattr(importlib.import_module(module), function)(config, FLAGS.workdir, overrides=overrides)


def _load_config():
  """The --config file, loaded now (ml_collections loads it lazily): one line if it fails."""
  try:
    config = FLAGS.config
    config.keys()
    return config
  except Exception as e:  # pylint: disable=broad-except  # the config file's own errors
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    detail = lines[-1] if lines else type(e).__name__
    _fail(f"cannot load --config={FLAGS['config'].serialize().split('=', 1)[-1]}: {detail}")


def parse_flags(argv):
  """absl flag parsing with one-line errors (unknown config fields, bad values) and exit 1."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    # A config file that raises: keep the flag and the exception line, not the traceback.
    _fail(lines[0] + (" " + lines[-1] if len(lines) > 1 else ""))
  except (AttributeError, KeyError) as e:  # ml_collections: unknown field in --config.a.b=...
    _fail(_unknown_field(e, argv))
  except (TypeError, ValueError) as e:
    _fail(f"bad flag value: {e}")
  except OSError as e:  # a --config file that cannot be read (an override made it load early)
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    _fail(f"cannot load --config: {lines[-1] if lines else type(e).__name__}")


def main(argv):
  from data.errors import DataError  # pylint: disable=g-import-not-at-top
  from hybrid_video.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    run(argv)
  except (UserError, DataError) as e:
    _fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
