"""ARL2 command line: python main.py --config=configs/default.py[:variant] --workdir=DIR --mode=MODE.

Modes: train (then stream a long video: the main job), sample.
User errors (bad config, flags, data, checkpoints, a non-finite loss) print one line and exit 1.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file[:variant].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and videos.")
flags.DEFINE_enum("mode", "train", ["train", "sample"], "What to run.")
flags.DEFINE_integer("num_frames", None, "--mode=sample: frames to stream (default: "
                     "config.sampler.num_frames).")
flags.DEFINE_integer("checkpoint_step", None, "--mode=sample: checkpoint step (default: latest).")
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.mark_flags_as_required(["workdir"])


def run(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  import jax  # pylint: disable=g-import-not-at-top
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


def main(argv):
  from data.errors import DataError  # pylint: disable=g-import-not-at-top
  from hybrid_video.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    run(argv)
  except (UserError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
