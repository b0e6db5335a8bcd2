"""Rebuild a trained model from a workdir: the checkpoint's config defines the model.

  model, config, step = load_model(config, workdir)                 # EMA parameters, latest step
  model, config, step = load_model(config, workdir, model_overrides={
      "memory.write_during_denoising": True})                       # a sampling-time ablation

The returned config is the given one with `model` and `data` taken from the checkpoint (the data
dir stays the given one when set), so shapes, the hybrid layer pattern, the memory read mode and
the cache policy are those the model was trained with. `model_overrides` may change only the
fields a checkpoint does not fix (`hybrid_video.checkpoint.FREE_FIELDS`: back-ends, the memory
ablation switches, the K/V cache bounds).
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from hybrid_video import checkpoint as ckpt_lib
from hybrid_video.errors import CheckpointError, UserError
from hybrid_video.nn.model import CausalDiT, ShapeOnlyRngs
from hybrid_video.optim import make_optimizer
from hybrid_video.train_state import abstract_train_state


def _deep_update(base: dict, new: Mapping) -> dict:
  out = copy.deepcopy(base)
  for k, v in new.items():
    if isinstance(v, Mapping) and isinstance(out.get(k), dict):
      out[k] = _deep_update(out[k], v)
    else:
      out[k] = copy.deepcopy(v)
  return out


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
  *path, last = dotted.split(".")
  for p in path:
    if not isinstance(d.get(p), dict):
      raise UserError(f"model override {dotted!r}: no config section {p!r}")
    d = d[p]
  if last not in d:
    raise UserError(f"model override {dotted!r}: no config field {last!r}")
  d[last] = value


def checkpoint_config(config, saved: Mapping, model_overrides: Mapping[str, Any] | None = None):
  """`config` with model/data from the saved checkpoint config, plus model_overrides."""
  model = _deep_update(config.model.to_dict(), saved.get("model", {}))
  for name, value in (model_overrides or {}).items():
    if f"model.{name}" not in ckpt_lib.FREE_FIELDS:
      allowed = sorted(f[len("model."):] for f in ckpt_lib.FREE_FIELDS)
      raise UserError(f"model override {name!r} would change the checkpoint's shapes; only "
                      f"these can be overridden: {', '.join(allowed)}")
    _set_dotted(model, name, value)
  data = _deep_update(config.data.to_dict(), saved.get("data", {}))
  if config.data.dir is not None:  # where the data lives here, not where it was at training
    data["dir"] = config.data.dir
  out = config.to_dict()
  out["model"], out["data"] = model, data
  return ml_collections.ConfigDict(out)


def command_line_model_overrides(cli_overrides: Mapping[str, Any] | None, saved: Mapping,
                                 where: str) -> dict[str, Any]:
  """The `model.*` fields given on the command line that a checkpoint's model can take (back-ends,
  ablation switches, cache bounds: FREE_FIELDS), without their 'model.' prefix. A field that would
  change the checkpoint's model is refused with one line naming the checkpoint's value, instead
  of being ignored."""
  out = {}
  saved_model = saved.get("model", {})
  for dotted, value in (cli_overrides or {}).items():
    if not dotted.startswith("model."):
      continue
    if dotted in ckpt_lib.FREE_FIELDS:
      out[dotted[len("model."):]] = value
      continue
    node: Any = saved_model
    for part in dotted.split(".")[1:]:
      node = node.get(part, "<absent>") if isinstance(node, Mapping) else "<absent>"
    if isinstance(node, list):
      node = tuple(node)
    if node != (tuple(value) if isinstance(value, list) else value):
      raise UserError(f"--config.{dotted}={value!r} cannot apply: the checkpoint in {where} was "
                      f"trained with {dotted}={node!r}; only back-end and ablation fields "
                      f"({', '.join(sorted(ckpt_lib.FREE_FIELDS))}) can change after training")
  return out


def load_model(config, workdir: str, step: int | None = None, *,
               model_overrides: Mapping[str, Any] | None = None,
               cli_overrides: Mapping[str, Any] | None = None,
               ema: bool = True) -> tuple[CausalDiT, ml_collections.ConfigDict, int]:
  """Restore the (EMA) parameters of `workdir`'s checkpoint `step` (default: latest).

  cli_overrides: the command line's `--config.*` values (main.py passes them): `model.*` ones
  apply where the checkpoint allows and are refused otherwise (command_line_model_overrides).
  Returns (model, config, step); config as described in the module docstring.
  """
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=int(config.train.keep_checkpoints))
  try:
    if step is None:
      step = checkpointer.latest_step()
    if step is None:
      raise CheckpointError(f"no checkpoint in {checkpointer.directory}; train first with "
                            f"--mode=train --workdir={workdir}")
    saved = checkpointer.saved_config(step)
    model_overrides = {**command_line_model_overrides(cli_overrides, saved, workdir),
                       **(model_overrides or {})}
    config = checkpoint_config(config, saved, model_overrides)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    saved_dtypes = checkpointer.saved_dtypes(step)
    if any(k.startswith("ema/") for k in saved_dtypes):  # a training checkpoint
      # The optimizer state's structure comes from the train config the checkpoint was saved
      # with.
      tcfg = ml_collections.ConfigDict(_deep_update(config.train.to_dict(),
                                                    saved.get("train", {})))
      abstract_model, abstract = abstract_train_state(config.model, make_optimizer(tcfg))
      part = "ema" if ema else "params"
    else:  # parameters only (--mode=import): restored in the dtypes they were stored in
      abstract_model = nnx.eval_shape(lambda: CausalDiT(config.model, rngs=ShapeOnlyRngs()))
      abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32),
                  "params": nnx.state(abstract_model, nnx.Param)}
      part = "params"
    # Plain single-device arrays, as a freshly built model has: restored with the training
    # mesh's sharding, the jitted steps' outputs would differ in sharding from a fresh carry and
    # retrace once. Callers that shard (the sampler's mesh) place the parameters themselves.
    abstract = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.ShapeDtypeStruct(
            x.shape, saved_dtypes.get(_path_name(path)) or x.dtype, sharding=device), abstract)
    state, step = checkpointer.restore(abstract, step)
  finally:
    checkpointer.close()
  graphdef, _ = nnx.split(abstract_model)
  model = nnx.merge(graphdef, state[part])
  return model, config, int(step)


def _path_name(path) -> str:
  """'params/blocks/0/ffn/fc1/kernel' for a tree path (as Checkpointer.saved_dtypes names it)."""
  parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
  return "/".join(p for p in parts if p != "value")


def parse_override_value(text: str) -> Any:
  """'true' -> True, '3' -> 3, '0.5' -> 0.5, 'none' -> None, otherwise the string."""
  low = text.strip().lower()
  if low in ("true", "false"):
    return low == "true"
  if low in ("none", "null"):
    return None
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text
