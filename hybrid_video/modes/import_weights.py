"""--mode=import: released DiT weights (config.weights.path: original Wan, diffusers, or a
Causal-Forcing / ARL2 `.pt`) -> a project checkpoint in <workdir>/checkpoints/0 (parameters and
config), from which --mode=sample, --mode=convert (as the teacher) and --mode=compile start.

  python main.py --mode=import --config=configs/wan.py:wan1_3b --workdir=runs/wan \\
      --config.weights.path=Wan2.1-T2V-1.3B
"""

from __future__ import annotations

import time

from hybrid_video.errors import UserError
from hybrid_video.weights.wan_dit import import_weights


def import_main(config, workdir: str, *, overrides=None) -> str:
  """Import config.weights.path into workdir; prints and returns the checkpoint directory."""
  if "weights" not in config or not config.weights.path:
    raise UserError("--mode=import needs a weights path: --config=configs/wan.py[:VARIANT] "
                    "--config.weights.path=FILE_OR_FOLDER")
  t0 = time.perf_counter()
  directory = import_weights(config, workdir)
  print(f"imported {config.weights.path} into {directory} ({time.perf_counter() - t0:.1f} s); "
        f"sample with --mode=sample --workdir={workdir}")
  return directory
