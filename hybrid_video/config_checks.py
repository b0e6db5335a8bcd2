"""Config and workdir checks made before any mode runs: one `UserError` line per bad value.

Each rule names a dotted field, what it accepts, and is skipped when the config has no such
field (configs differ by mode). The modes keep their own deeper checks (shapes against data,
checkpoints against configs); this catches the values that would otherwise fail deep inside JAX
or be silently ignored.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from hybrid_video.errors import UserError

_MISSING = object()

IMPLEMENTATIONS = (None, "xla", "reference", "pallas")
MEMORY_READS = ("block", "token")  # model.memory.read: ARL2's per-chunk read; the ablation's


def _positive(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _non_negative(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _one_of(*choices) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: v in choices), f"one of {', '.join(repr(c) for c in choices)}"


POSITIVE = (_positive, "a positive integer")
NON_NEGATIVE = (_non_negative, "an integer >= 0")
POSITIVE_NUMBER = (lambda v: _number(v) and v > 0, "a positive number")
NON_NEGATIVE_NUMBER = (lambda v: _number(v) and v >= 0, "a number >= 0")
UNIT_INTERVAL = (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)")

RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.dtype": _one_of("float32", "bfloat16"),
    "model.cond": _one_of("labels", "none", "embeddings"),
    "model.prediction": _one_of("velocity", "x0"),
    "model.memory.read": _one_of(*MEMORY_READS),
    "convert.memory_read": _one_of(*MEMORY_READS),
    "model.attention_impl": _one_of(*IMPLEMENTATIONS),
    "model.memory_impl": _one_of(*IMPLEMENTATIONS),
    "model.dim": POSITIVE,
    "model.num_layers": POSITIVE,
    "model.num_heads": POSITIVE,
    "model.mlp_dim": POSITIVE,
    "model.frames_per_chunk": POSITIVE,
    "model.gdn_chunk_size": POSITIVE,
    "model.label_tokens": POSITIVE,
    "model.kv_cache.sink_chunks": NON_NEGATIVE,
    "model.kv_cache.window_chunks": NON_NEGATIVE,
    "sampler.kind": _one_of("euler", "few_step"),
    "sampler.num_steps": POSITIVE,
    "sampler.num_frames": POSITIVE,
    "sampler.cache_chunks": POSITIVE,
    "sampler.shift": POSITIVE_NUMBER,
    "sampler.guidance": POSITIVE_NUMBER,
    "train.batch_size": POSITIVE,
    "train.grad_accum_steps": POSITIVE,
    "train.num_steps": POSITIVE,
    "train.learning_rate": POSITIVE_NUMBER,
    "train.warmup_steps": NON_NEGATIVE,
    "train.log_every": POSITIVE,
    "train.checkpoint_every": POSITIVE,
    "train.keep_checkpoints": POSITIVE,
    "train.max_minutes": NON_NEGATIVE_NUMBER,
    "train.grad_clip": POSITIVE_NUMBER,
    "train.ema_decay": UNIT_INTERVAL,
    "train.label_dropout": UNIT_INTERVAL,
    "train.model_guidance": UNIT_INTERVAL,
    "train.sample_every": NON_NEGATIVE,
    "train.sample_frames": POSITIVE,
    "train.t_logit_std": POSITIVE_NUMBER,
    "train.resume_step": (lambda v: v is None or _non_negative(v), "None or an integer >= 0"),
    "data.source": _one_of("moving_digits", "video_folder", "latent_clips"),
    "data.num_frames": POSITIVE,
    "data.channels": POSITIVE,
    "data.fps": POSITIVE_NUMBER,
    "eval.num_frames": POSITIVE,
    "eval.num_videos": POSITIVE,
    "eval.batch_size": POSITIVE,
    "eval.num_seeds": POSITIVE,
    "eval.gap_window": POSITIVE,
    "eval.condition": _one_of("label", "null"),
    "video_fps": POSITIVE,
    "video_upscale": POSITIVE,
}


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return _MISSING
  return node


def check_config(config) -> None:
  """Raise a UserError naming the first field whose value is not accepted."""
  for field, (ok, accepted) in RULES.items():
    value = _get(config, field)
    if value is _MISSING:
      continue
    if not ok(value):
      raise UserError(f"--config.{field}={value!r} is not accepted: it must be {accepted}")


def check_workdir(workdir: str) -> None:
  """The workdir may exist only as a directory; its parent must be writable to create it."""
  if not workdir:
    raise UserError("--workdir must not be empty")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir} exists and is not a directory")
  parent = os.path.dirname(os.path.abspath(workdir))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
    raise UserError(f"--workdir={workdir} cannot be created: {parent} is not a writable "
                    "directory")
