"""The weights a Wan DiT import reads: container, key names, shapes, layout and config.json,
from headers only (hybrid_video/weights/wan_dit.py streams the tensors afterwards).

Containers: a safetensors file, a sharded folder with its index (a diffusers pipeline root is
read through its `transformer/`), or a torch pickle (.pt/.pth, opened by io.load_torch with
weights_only=True and mmap) whose `generator_ema` / `generator` entry (weights.pt_key) or whole
self is a state dict. The layout comes from the key names (wan_dit_keys.detect_names);
weights.layout, when not "auto", must agree with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Mapping

import numpy as np

from hybrid_video.weights import io, pread
from hybrid_video.weights.io import WeightsError
from hybrid_video.weights.wan_dit_keys import detect_names

LAYOUTS = ("auto", "original", "diffusers", "pt")
PT_KEYS = ("generator_ema", "generator")

# model config field -> (original Wan config.json name, diffusers config.json name)
CONFIG_JSON_FIELDS = {
    "num_layers": ("num_layers", "num_layers"), "num_heads": ("num_heads", "num_attention_heads"),
    "mlp_dim": ("ffn_dim", "ffn_dim"), "in_channels": ("in_dim", "in_channels"),
    "out_channels": ("out_dim", "out_channels"), "freq_dim": ("freq_dim", "freq_dim"),
    "text_dim": ("text_dim", "text_dim"), "patch_size": ("patch_size", "patch_size"),
}


# -- the source ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Source:
  """One weights file or folder: key names, shapes and layout, read from headers only."""
  path: str                                    # what is read (a diffusers root -> transformer/)
  layout: str                                  # "original" | "diffusers" | "pt"
  shapes: dict[str, tuple[tuple[int, ...], str]]
  config_json: dict | None = None
  config_json_path: str | None = None
  torch_state: Mapping[str, Any] | None = None  # the chosen state dict of a pickle (mmap)

  def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) one at a time, in file order; each array owns its aligned buffer."""
    if self.torch_state is not None:
      # Copied out of torch's memory map: the placed parameter may alias the buffer (pread.py),
      # and must not alias the file.
      return ((name, pread.aligned(np.array(x, copy=True)))
              for name, x in io.iter_torch_state_dict(self.torch_state, where=self.path))
    return pread.iter_safetensors(self.path)  # not io's memory map: see pread.py


def _torch_state_dict(obj, pt_key: str, path: str) -> Mapping[str, Any]:
  if not isinstance(obj, Mapping):
    raise WeightsError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
  if pt_key in obj:
    state = obj[pt_key]
  elif any(k in obj for k in PT_KEYS):
    raise WeightsError(f"{path} has no {pt_key!r} entry (it has {sorted(map(str, obj))}); set "
                       f"--config.weights.pt_key to one of them")
  else:
    state = obj  # a plain state dict
  if not isinstance(state, Mapping):
    raise WeightsError(f"{path}: {pt_key!r} holds a {type(state).__name__}, not a state dict")
  bad = [k for k, v in state.items() if not hasattr(v, "shape")]
  if bad:
    raise WeightsError(f"{path}: entries {sorted(map(str, bad))[:3]} are not tensors; set "
                       f"--config.weights.pt_key to the state dict's entry ({', '.join(PT_KEYS)})")
  return state


def open_source(wcfg) -> Source:
  """The weights named by `wcfg` (config.weights), headers only. One-line WeightsError if the
  path is not a checkpoint, is not a Wan DiT, or is not in the configured layout."""
  path, layout = wcfg.get("path"), wcfg.get("layout") or "auto"
  if not path:
    raise WeightsError("set --config.weights.path to the Wan DiT weights (file or folder)")
  if layout not in LAYOUTS:
    raise WeightsError(f"weights.layout={layout!r} must be one of {LAYOUTS}")
  pt_key = wcfg.get("pt_key") or "generator_ema"
  if pt_key not in PT_KEYS:
    raise WeightsError(f"weights.pt_key={pt_key!r} must be one of {PT_KEYS}")
  if not os.path.exists(path):
    raise WeightsError(f"weights path {path} does not exist")
  torch_state, config_dir = None, None
  if os.path.isfile(path) and path.endswith(io.TORCH_SUFFIXES):
    torch_state = _torch_state_dict(io.load_torch(path), pt_key, path)
    shapes = {k: (tuple(v.shape), str(v.dtype)) for k, v in torch_state.items()}
  else:
    if os.path.isdir(os.path.join(path, "transformer")):  # a diffusers pipeline root
      path = os.path.join(path, "transformer")
    shapes = io.safetensors_shapes(path)
    config_dir = path if os.path.isdir(path) else os.path.dirname(path)
  detected = detect_names(shapes)
  if detected is None:
    raise WeightsError(f"{path} does not hold Wan DiT weights (keys such as "
                       f"{', '.join(sorted(shapes)[:3]) or 'none'})")
  if layout not in ("auto", detected):
    raise WeightsError(f"weights.layout={layout!r} but {path} holds {detected}-layout keys "
                       f"(such as {sorted(shapes)[0]}); set --config.weights.layout={detected}")
  source = Source(path, detected, shapes, torch_state=torch_state)
  json_path = os.path.join(config_dir, "config.json") if config_dir else None
  if json_path and os.path.isfile(json_path):
    try:
      with open(json_path) as f:
        source.config_json, source.config_json_path = dict(json.load(f)), json_path
    except (OSError, ValueError, TypeError) as e:
      raise WeightsError(f"{json_path} is not a readable JSON config ({e})") from None
  return source


def check_config_json(source: Source, model_cfg) -> None:
  """The file's config.json (when present) against the model config: names every field that
  differs (the head count, for one, is invisible in the shapes)."""
  cj = source.config_json
  if not cj:
    return
  diffusers = "num_attention_heads" in cj
  want = {"dim": int(model_cfg.dim)}
  if diffusers:
    got = {"dim": cj["num_attention_heads"] * cj.get("attention_head_dim", 0) or None}
  else:
    got = {"dim": cj.get("dim")}
  for field, names in CONFIG_JSON_FIELDS.items():
    got[field] = cj.get(names[1 if diffusers else 0])
    want[field] = model_cfg[field]
  diffs = []
  for field, value in got.items():
    if value is None:
      continue
    expected = tuple(want[field]) if field == "patch_size" else want[field]
    value = tuple(value) if field == "patch_size" else value
    if value != expected:
      diffs.append(f"{field}={value!r} in the file, model.{field}={expected!r}")
  if diffs:
    raise WeightsError(f"{source.config_json_path} does not match the model config: "
                       f"{'; '.join(diffs)}")
