"""ARL2 command line: python main.py --config=configs/default.py[:variant] --workdir=DIR --mode=MODE.

Modes: train (then stream a long video: the main job), sample, convert (softmax teacher ->
ARL2 hybrid, configs/convert.py), benchmark (per-chunk time and memory of each attention
policy, configs/benchmark.py), eval (long-horizon continuation metrics of checkpoints),
compile (lower + compile the train and sampler steps for the mesh; print memory and FLOPs).
User errors (bad config, flags, data, checkpoints, a non-finite loss) print one line and exit 1.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


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
                                   "compile"], "What to run.")
flags.DEFINE_integer("num_frames", None, "--mode=sample: frames to stream (default: "
                     "config.sampler.num_frames).")
flags.DEFINE_integer("checkpoint_step", None, "--mode=sample: checkpoint step (default: latest).")
flags.DEFINE_integer("benchmark_chunks", None, "--mode=benchmark: chunks per policy (default: "
                     "config.benchmark.num_chunks, the paper's horizon).")
flags.DEFINE_string("eval_workdirs", None, "--mode=eval: [LABEL=]WORKDIR[+FIELD=VALUE...],... "
                    "checkpoints compared side by side (default: --workdir).")
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize (multi-host). With no "
                  "coordinator flags, JAX reads the cluster from the environment (TPU pods, "
                  "SLURM, Open MPI).")
flags.DEFINE_string("coordinator_address", None, "--distributed: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "--distributed: number of processes.")
flags.DEFINE_integer("process_id", None, "--distributed: index of this process.")
flags.mark_flags_as_required(["workdir"])


def run(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS["verbosity"].present:  # keep library INFO chatter (orbax, tfds) out of the way
    logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.distributed:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.info("JAX %s, %d process(es), devices: %s", jax.__version__, jax.process_count(),
               jax.devices())
  config = FLAGS.config
  if FLAGS.mode == "train":
    from hybrid_video.train import train_main  # pylint: disable=g-import-not-at-top
    train_main(config, FLAGS.workdir, progress=FLAGS.progress)
  elif FLAGS.mode == "sample":
    from hybrid_video.sample import sample_main  # pylint: disable=g-import-not-at-top
    sample_main(config, FLAGS.workdir, num_frames=FLAGS.num_frames,
                checkpoint_step=FLAGS.checkpoint_step, progress=FLAGS.progress)
  elif FLAGS.mode == "convert":
    from hybrid_video.convert import convert_main  # pylint: disable=g-import-not-at-top
    convert_main(config, FLAGS.workdir, progress=FLAGS.progress)
  elif FLAGS.mode == "benchmark":
    from hybrid_video.benchmark import benchmark_main  # pylint: disable=g-import-not-at-top
    benchmark_main(config, FLAGS.workdir, num_chunks=FLAGS.benchmark_chunks,
                   progress=FLAGS.progress)
  elif FLAGS.mode == "compile":
    from hybrid_video.aot import compile_main  # pylint: disable=g-import-not-at-top
    compile_main(config, FLAGS.workdir)
  elif FLAGS.mode == "eval":
    from hybrid_video.evaluate import evaluate_main  # pylint: disable=g-import-not-at-top
    evaluate_main(config, FLAGS.workdir, eval_workdirs=FLAGS.eval_workdirs,
                  checkpoint_step=FLAGS.checkpoint_step, progress=FLAGS.progress)


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


def main(argv):
  from data.errors import DataError  # pylint: disable=g-import-not-at-top
  from hybrid_video.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    run(argv)
  except (UserError, DataError) as e:
    _fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
