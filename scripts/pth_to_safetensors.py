"""Convert a torch pickle (.pt / .pth) to safetensors once, so a TPU host needs no torch.

  python scripts/pth_to_safetensors.py causal_forcing.pt causal_forcing.safetensors \
      [--key=generator_ema|generator]

For a Causal-Forcing / Self-Forcing / ARL2 checkpoint (a dict with `generator` and/or
`generator_ema`) the chosen entry's state dict is written with its names unchanged (`model.`,
wrapper prefixes and all): the importer reads the result as the "pt" layout. A plain state dict
(Wan2.1_VAE.pth, the umT5 .pth) is written whole. The pickle is opened only through
hybrid_video/weights/io.py `load_torch` (weights_only=True, mmap) and written tensor by tensor, so
memory stays near one tensor beyond the mapped file. bf16 stays bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterable, Mapping

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hybrid_video.weights import io  # pylint: disable=wrong-import-position

KEYS = ("generator_ema", "generator")
# safetensors dtype codes, by numpy dtype name and by torch dtype name.
DTYPE_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
               "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
               "bool": "BOOL"}


def write_safetensors(path: str, tensors: Iterable[tuple[str, tuple[int, ...], str]], data,
                      metadata: Mapping[str, str] | None = None) -> int:
  """Stream a safetensors file: `tensors` gives (name, shape, dtype name) for the header, then
  `data(name)` returns each array (C order) just before it is written. Returns bytes written."""
  header, offset, order = {}, 0, []
  for name, shape, dtype in tensors:
    code = DTYPE_CODES.get(dtype.replace("torch.", ""))
    if code is None:
      raise io.WeightsError(f"{name}: dtype {dtype} has no safetensors code")
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(
        "uint16" if code == "BF16" else dtype.replace("torch.", "")).itemsize
    header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
    offset += size
    order.append((name, size))
  if metadata:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
  tmp = path + ".partial"
  with open(tmp, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for name, size in order:
      array = np.ascontiguousarray(data(name))
      if array.nbytes != size:
        raise io.WeightsError(f"{name}: {array.nbytes} bytes, the header says {size}")
      f.write(memoryview(array.reshape(-1).view(np.uint8)))
  os.replace(tmp, path)  # no half-written file under the final name
  return 8 + len(blob) + offset


def state_dict(obj, key: str, path: str) -> Mapping:
  """The chosen generator entry, or the object itself when it is a plain state dict."""
  if isinstance(obj, Mapping) and key in obj:
    return obj[key]
  if isinstance(obj, Mapping) and any(k in obj for k in KEYS):
    raise io.WeightsError(f"{path} has no {key!r} entry (it has {sorted(map(str, obj))}); "
                          f"choose --key from them")
  return obj


def convert(src: str, dst: str, key: str = "generator_ema") -> int:
  """src .pt/.pth -> dst .safetensors. Returns the number of tensors written."""
  obj = io.load_torch(src)
  state = state_dict(obj, key, src)
  if not isinstance(state, Mapping) or not all(hasattr(v, "shape") for v in state.values()):
    raise io.WeightsError(f"{src}: {key!r} is not a state dict of tensors")
  header = [(name, tuple(t.shape), str(t.dtype)) for name, t in state.items()]
  entry = key if state is not obj else ""
  write_safetensors(dst, header, lambda name: io.torch_to_numpy(state[name]),
                    {"source": os.path.basename(src), "entry": entry})
  return len(header)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("src", help=".pt / .pth file")
  parser.add_argument("dst", help="output .safetensors file")
  parser.add_argument("--key", default="generator_ema", choices=KEYS,
                      help="entry of a Causal-Forcing / ARL2 checkpoint dict (default: %(default)s)")
  args = parser.parse_args(argv)
  try:
    count = convert(args.src, args.dst, args.key)
  except io.WeightsError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.dst}: {count} tensors ({os.path.getsize(args.dst) / 1e9:.2f} GB)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
