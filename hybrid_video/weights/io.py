"""Reading released weight files tensor by tensor, without torch where possible.

Formats:
- safetensors: one file, or a folder of shards with `*.safetensors.index.json` (the diffusers and
  HF layouts). Read lazily, one tensor at a time, through `safetensors.flax` (bf16 supported;
  `safetensors.numpy` cannot read bf16). Tensors come back as numpy arrays (bf16 as
  `ml_dtypes.bfloat16`).
- torch pickles (`.pt`, `.pth`): only through `torch.load(weights_only=True, mmap=True)`. torch is
  an optional dependency; without it the error says how to install it, or how to convert the file
  to safetensors once on a machine that has torch (`scripts/pth_to_safetensors.py`).

Every failure is a `WeightsError` (a `UserError`): main.py prints it as one line and exits 1.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from hybrid_video.errors import UserError

TORCH_HINT = ("reading .pt/.pth files needs PyTorch (CPU is enough): "
              "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; "
              "or convert the file once where torch is installed: "
              "python scripts/pth_to_safetensors.py IN.pth OUT.safetensors")

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class WeightsError(UserError):
  """A weights file or folder that cannot be imported (missing, unreadable, wrong keys/shapes)."""


# --------------------------------------------------------------------------- safetensors


def safetensors_files(path: str) -> list[str]:
  """The safetensors files of `path`: the file itself, or a folder's shards (index order)."""
  if not os.path.exists(path):
    raise WeightsError(f"weights path {path} does not exist")
  if os.path.isfile(path):
    if not path.endswith(".safetensors"):
      raise WeightsError(f"{path} is not a .safetensors file")
    return [path]
  indexes = sorted(f for f in os.listdir(path) if f.endswith(".safetensors.index.json"))
  if indexes:
    index_path = os.path.join(path, indexes[0])
    try:
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise WeightsError(f"{index_path} is not a safetensors index ({type(e).__name__})") from None
    files = list(dict.fromkeys(weight_map.values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    if missing:
      raise WeightsError(f"{index_path} names shards that are missing: {', '.join(missing)}")
    return [os.path.join(path, f) for f in files]
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise WeightsError(f"no .safetensors files in {path}")
  return [os.path.join(path, f) for f in files]


def _safe_open(path: str):
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top  # optional heavy import
  try:
    return safe_open(path, framework="flax")
  except Exception as e:  # safetensors raises SafetensorError / OSError for a bad header
    raise WeightsError(f"{path} is not a readable safetensors file "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
                       ) from None


def safetensors_shapes(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
  """{name: (shape, dtype string)} of every tensor, read from the headers alone."""
  out = {}
  for file in safetensors_files(path):
    with open(file, "rb") as f:
      try:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or n > 100 * 2**20:
          raise ValueError("bad header length")
        header = json.loads(f.read(n))
      except (ValueError, OSError) as e:
        raise WeightsError(f"{file} is not a safetensors file ({e})") from None
    for name, meta in header.items():
      if name != "__metadata__":
        out[name] = (tuple(meta["shape"]), meta["dtype"])
  return out


def iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """Yield (name, array) for every tensor of a file or sharded folder, one at a time."""
  for file in safetensors_files(path):
    with _safe_open(file) as f:
      for name in f.keys():
        yield name, np.asarray(f.get_tensor(name))


# --------------------------------------------------------------------------- torch pickles


def load_torch(path: str) -> Any:
  """`torch.load(path, weights_only=True, mmap=True)` with one-line errors."""
  if not os.path.isfile(path):
    raise WeightsError(f"weights file {path} does not exist")
  try:
    import torch  # pylint: disable=g-import-not-at-top  # optional dependency
  except ImportError:
    raise WeightsError(f"cannot read {path}: {TORCH_HINT}") from None
  try:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  except Exception as e:  # UnpicklingError for refused globals, RuntimeError for non-zip files
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    if "weights_only" in str(e) or type(e).__name__ == "UnpicklingError":
      raise WeightsError(f"{path} holds objects that torch.load(weights_only=True) refuses to "
                         f"unpickle; it is not a plain checkpoint of tensors ({first})") from None
    raise WeightsError(f"{path} is not a torch checkpoint ({type(e).__name__}: {first})") from None


def torch_to_numpy(tensor) -> np.ndarray:
  """A torch tensor as numpy; bf16 becomes ml_dtypes.bfloat16 without a float32 detour."""
  import torch  # pylint: disable=g-import-not-at-top  # only called on tensors torch produced
  t = tensor.detach().cpu()
  if t.dtype == torch.bfloat16:
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def iter_torch_state_dict(state: Mapping[str, Any], *, where: str
                          ) -> Iterator[tuple[str, np.ndarray]]:
  """Yield (name, numpy array) of a state dict's tensors; non-tensors are an error."""
  if not isinstance(state, Mapping):
    raise WeightsError(f"{where} does not hold a state dict (found {type(state).__name__})")
  for name, value in state.items():
    if not hasattr(value, "detach"):
      raise WeightsError(f"{where}: entry {name!r} is a {type(value).__name__}, not a tensor")
    yield name, torch_to_numpy(value)


# --------------------------------------------------------------------------- key handling


def strip_prefixes(name: str, prefixes: tuple[str, ...]) -> str:
  """Remove every occurrence of the wrapper prefixes (FSDP, activation checkpointing)."""
  for p in prefixes:
    name = name.replace(p, "")
  return name


def check_keys(found: set[str], expected: set[str], *, where: str,
               ignore: Callable[[str], bool] = lambda k: False) -> None:
  """One-line error naming the first missing / unexpected keys."""
  missing = sorted(expected - found)
  unexpected = sorted(k for k in found - expected if not ignore(k))
  if missing:
    more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
    raise WeightsError(f"{where} is missing {len(missing)} expected key(s): "
                       f"{', '.join(missing[:3])}{more}")
  if unexpected:
    more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
    raise WeightsError(f"{where} has {len(unexpected)} unexpected key(s): "
                       f"{', '.join(unexpected[:3])}{more}")


def check_shape(name: str, got: tuple[int, ...], want: tuple[int, ...], *, where: str) -> None:
  if tuple(got) != tuple(want):
    raise WeightsError(f"{where}: {name} has shape {tuple(got)} but the config expects "
                       f"{tuple(want)}")
