"""Data package: tfds builders (array_record, no TensorFlow) and a grain input pipeline.

Submodules (import them explicitly; this package init stays light):
  data.moving_digits  - `moving_digits` tfds builder + numpy ground-truth helpers.
  data.video_folder   - `video_folder` tfds builder for a folder of .mp4/.webm files.
  data.pipeline       - `make_iterator` / `to_model_inputs` (grain, no TensorFlow).
"""

from data.errors import DataError

__all__ = ["DataError"]
