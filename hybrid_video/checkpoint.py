"""Orbax checkpoints: the train state plus the config as JSON, last N kept, automatic resume.

Layout: <workdir>/checkpoints/<step>/{state, config}. A checkpoint that cannot be read, or
one written by a config with different model/data shapes, stops the run with a message that
names the problem; nothing on disk is deleted because of it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp

from hybrid_video.errors import CheckpointError

# Config sections that fix the shapes of the saved state: they must match to resume.
COMPATIBILITY_SECTIONS = ("model",)
# Fields inside those sections that may change between runs (back-ends, not shapes).
FREE_FIELDS = {"model.attention_impl", "model.memory_impl", "model.kernel_interpret",
               "model.lora.init",
               "model.gdn_chunk_size",
               "model.memory.read", "model.memory.write_during_denoising", "model.remat",
               "model.remat_policy", "model.scan_layers",
               "model.kv_cache.sink_chunks", "model.kv_cache.window_chunks", "model.dtype"}

# Fields added after checkpoints were first written: a saved config without one meant this value.
FIELD_DEFAULTS = {"model.prediction": "velocity", "model.null_label": False,
                  "model.label_adaln": False, "model.label_tokens": 1, "sampler.guidance": 1.0}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def config_differences(saved: dict, current: dict) -> list[str]:
  """Names of shape-relevant fields whose values differ, e.g. ['model.dim: 64 -> 96']."""
  diffs = []
  for section in COMPATIBILITY_SECTIONS:
    a = _flatten(saved.get(section, {}), f"{section}.")
    b = _flatten(current.get(section, {}), f"{section}.")
    for key in sorted(set(a) | set(b)):
      if key in FREE_FIELDS:
        continue
      absent = FIELD_DEFAULTS.get(key, "<absent>")
      va, vb = a.get(key, absent), b.get(key, absent)
      if isinstance(va, list):
        va = tuple(va)
      if isinstance(vb, list):
        vb = tuple(vb)
      if va != vb:
        diffs.append(f"{key}: {va!r} -> {vb!r}")
  return diffs


def config_to_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with composite (state, config) items."""

  def __init__(self, workdir: str, *, keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    # Handlers named up front, so metadata can be read before anything is restored.
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, config, *, force: bool = False) -> bool:
    saved = self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_to_json(config))),
        force=force)
    return saved

  def wait(self):
    self.manager.wait_until_finished()

  def saved_config(self, step: int) -> dict:
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
      return dict(restored["config"])
    except Exception as e:  # orbax raises many types for damaged files
      raise CheckpointError(self._unreadable(step, e)) from None

  def saved_dtypes(self, step: int) -> dict[str, Any]:
    """{"params/blocks/0/ffn/fc1/kernel": dtype, ...}: the saved state's leaves, from the
    checkpoint's metadata (nothing is read)."""
    try:
      tree = self.manager.item_metadata(step)["state"].tree
    except Exception as e:  # orbax raises many types for damaged files
      raise CheckpointError(self._unreadable(step, e)) from None
    flat = {}

    def walk(node, prefix):
      if isinstance(node, dict):
        for k, v in node.items():
          walk(v, f"{prefix}{k}/")
      elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
          walk(v, f"{prefix}{i}/")
      else:
        flat[prefix[:-1]] = getattr(node, "dtype", None)

    walk(tree, "")
    return flat

  def check_compatible(self, step: int, config) -> None:
    diffs = config_differences(self.saved_config(step), config_to_json(config))
    if diffs:
      raise CheckpointError(
          f"the checkpoint at step {step} in {self.directory} comes from an incompatible config; "
          f"fields that differ (checkpoint -> now): {'; '.join(diffs)}. Use another --workdir "
          "or the checkpoint's config.")

  def restore(self, abstract_state, step: int | None = None):
    """Restore into `abstract_state` (ShapeDtypeStructs, possibly sharded). Returns (state, step)."""
    steps = self.all_steps()
    if step is None:
      step = self.latest_step()
    elif step not in steps:
      raise CheckpointError(f"no checkpoint at step {step} in {self.directory}; "
                            f"available steps: {steps}")
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:  # orbax raises many types for damaged files
      raise CheckpointError(self._unreadable(step, e)) from None
    return restored["state"], step

  def _unreadable(self, step: int, e: Exception) -> str:
    older = [s for s in self.all_steps() if s < step]
    hint = (f" Older checkpoints are kept: resume from one with "
            f"--config.train.resume_step={older[-1]}." if older else "")
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    # TensorStore's messages embed object reprs with addresses: keep only what a user can read.
    msg = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<...>", msg)[:200]
    return (f"checkpoint at step {step} in {self.directory} is unreadable or corrupt "
            f"({type(e).__name__}: {msg}); nothing was deleted.{hint}")

  def close(self):
    self.manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings where present) of a pytree of arrays."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)
