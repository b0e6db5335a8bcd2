"""Streaming safetensors reads with plain file reads instead of a memory map.

`io.iter_safetensors` goes through `safetensors.safe_open`, which maps the whole file: every page
it touches stays in the process's RSS until the file is closed, so importing a 5.68 GB checkpoint
peaks at ~2x the file (the mapped pages plus the placed parameters), and the page faults make it
~5x slower than sequential reads (measured by scripts/bench_import.py). Reading each tensor with
`readinto` into a fresh buffer keeps RSS at one tensor beyond what has been placed.

Buffers are 64-byte aligned (`aligned_empty`): on the CPU backend `jax.device_put` of an aligned
numpy array aliases it instead of copying (0.1 ms instead of ~150 ms for a 55 MB matrix).

Same contract as `io.iter_safetensors`: a file or a sharded folder (via `io.safetensors_files`),
(name, numpy array) one at a time in file order, bf16 as `ml_dtypes.bfloat16`.
"""

from __future__ import annotations

import json
from typing import Iterator

import ml_dtypes
import numpy as np

from hybrid_video.weights import io
from hybrid_video.weights.io import WeightsError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}
MAX_HEADER = 100 * 2**20
ALIGN = 64


def aligned_empty(shape, dtype) -> np.ndarray:
  """An uninitialised C-contiguous array whose data starts on an ALIGN-byte boundary."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(nbytes + ALIGN, np.uint8)
  start = (-raw.ctypes.data) % ALIGN
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def aligned(x: np.ndarray) -> np.ndarray:
  """x itself when C-contiguous and aligned, else an aligned copy."""
  if x.flags.c_contiguous and x.ctypes.data % ALIGN == 0:
    return x
  out = aligned_empty(x.shape, x.dtype)
  out[...] = x
  return out


def _header(f, file: str) -> tuple[dict, int]:
  try:
    n = int.from_bytes(f.read(8), "little")
    if n <= 0 or n > MAX_HEADER:
      raise ValueError("bad header length")
    header = json.loads(f.read(n))
  except (ValueError, OSError) as e:
    raise WeightsError(f"{file} is not a safetensors file ({e})") from None
  header.pop("__metadata__", None)
  return header, 8 + n


def iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """Yield (name, array) for every tensor of a file or sharded folder, one at a time."""
  for file in io.safetensors_files(path):
    with open(file, "rb") as f:
      header, base = _header(f, file)
      for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        dtype = DTYPES.get(meta["dtype"])
        if dtype is None:
          raise WeightsError(f"{file}: {name} has dtype {meta['dtype']}, which the importer "
                             "does not read")
        begin, end = meta["data_offsets"]
        shape = tuple(meta["shape"])
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if end - begin != size:
          raise WeightsError(f"{file}: {name} spans {end - begin} bytes, its shape {shape} and "
                             f"dtype {meta['dtype']} need {size}")
        buffer = aligned_empty((size,), np.uint8)
        f.seek(base + begin)
        if f.readinto(memoryview(buffer)) != size:
          raise WeightsError(f"{file} is truncated: {name} ends past the end of the file")
        yield name, buffer.view(dtype).reshape(shape)
