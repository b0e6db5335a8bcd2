"""Shared setup for the data tests (all offline, small and CPU-only)."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def _quiet_tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()
