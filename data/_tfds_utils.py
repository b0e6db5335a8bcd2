"""Shared helpers for the tfds builders of this package (no TensorFlow needed)."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from data.errors import DataError

logger = logging.getLogger(__name__)

ARRAY_RECORD = "array_record"


def code_path_of(module_file: str):
  """Value for a builder's `code_path` classproperty.

  tfds 4.9.10's default `DatasetBuilder.code_path` touches
  `importlib_resources` (an optional backport that is not installed here) for
  any builder defined inside a package, which breaks `download_and_prepare`.
  Our builders override `code_path` with this plain path instead.
  """
  from etils import epath  # pylint: disable=g-import-not-at-top

  return epath.Path(module_file)


def default_data_dir() -> str:
  """Same default as tfds: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), "tensorflow_datasets"
  )


def check_writable_dir(data_dir: str | os.PathLike[str]) -> str:
  """Creates `data_dir` if needed and checks a file can be written in it.

  Raises:
    DataError: naming `data_dir` if it cannot be created or written.
  """
  path = os.path.abspath(os.fspath(data_dir))
  try:
    os.makedirs(path, exist_ok=True)
    if not os.path.isdir(path):
      raise NotADirectoryError(path)
    # os.access lies for root and some network file systems: really write.
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
      pass
  except OSError as e:
    raise DataError(
        f"data_dir {path!r} is not writable, so the dataset cannot be"
        f" prepared there ({type(e).__name__}: {e}). Pass a writable data_dir."
    ) from e
  return path


def is_prepared(builder: Any) -> bool:
  """`builder.is_prepared()` without tfds' warning about a missing folder."""
  info_file = os.path.join(os.fspath(builder.data_dir), "dataset_info.json")
  return os.path.exists(info_file) and builder.is_prepared()


def prepare_builder(builder: Any) -> Any:
  """Runs `download_and_prepare` (no download happens) unless already prepared."""
  if is_prepared(builder):
    logger.info("Reusing prepared dataset at %s", builder.data_dir)
    return builder
  check_writable_dir(builder.data_dir_root)
  builder.download_and_prepare(file_format=ARRAY_RECORD)
  return builder
