"""Metric writing: TensorBoard event files (tensorboardX, no TensorFlow) plus a JSONL log.

Only process 0 writes; other processes get a writer that drops everything.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import jax
import numpy as np


class MetricWriter:

  def __init__(self, logdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      os.makedirs(logdir, exist_ok=True)
      self._tb = SummaryWriter(logdir)
      self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a")

  def write_scalars(self, step: int, scalars: Mapping[str, float]):
    if not self.enabled:
      return
    clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
    for k, v in clean.items():
      self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()

  def write_text(self, step: int, tag: str, text: str):
    if self.enabled:
      self._tb.add_text(tag, text, step)

  def flush(self):
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self):
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      self.enabled = False


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
