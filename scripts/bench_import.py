"""Benchmark: import a full-size random Wan2.1-T2V-1.3B DiT (original layout) into the model.

  python scripts/bench_import.py [--dir=/tmp/wan_bench] [--variant=wan1_3b] [--keep]

1. Writes <dir>/config.json and <dir>/diffusion_pytorch_model.safetensors: the 825 tensors of the
   original release at their real names and shapes (wan-stack.md §2; 1,418,996,800 parameters,
   5.68 GB fp32), random values, streamed tensor by tensor.
2. Imports it in a fresh process with hybrid_video/weights/wan_dit.py `load_params` into
   configs/wan.py:VARIANT (no mesh: the first device), and reports wall time and the child's
   peak RSS against the targets (<= 60 s, <= 1.5x the file size).
3. Deletes the folder unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.pth_to_safetensors import write_safetensors  # pylint: disable=wrong-import-position

DIM, FFN, FREQ, TEXT, HEADS, LAYERS, CHANNELS = 1536, 8960, 256, 4096, 12, 30, 16
WAN_PARAMS = 1_418_996_800


def wan_shapes() -> list[tuple[str, tuple[int, ...]]]:
  """(name, shape) of the released Wan2.1-T2V-1.3B DiT, original layout."""
  shapes = [("patch_embedding.weight", (DIM, CHANNELS, 1, 2, 2)), ("patch_embedding.bias", (DIM,))]
  for name, (n_out, n_in) in (("text_embedding.0", (DIM, TEXT)), ("text_embedding.2", (DIM, DIM)),
                              ("time_embedding.0", (DIM, FREQ)), ("time_embedding.2", (DIM, DIM)),
                              ("time_projection.1", (6 * DIM, DIM)),
                              ("head.head", (4 * CHANNELS, DIM))):
    shapes += [(f"{name}.weight", (n_out, n_in)), (f"{name}.bias", (n_out,))]
  shapes.append(("head.modulation", (1, 2, DIM)))
  for i in range(LAYERS):
    b = f"blocks.{i}"
    shapes.append((f"{b}.modulation", (1, 6, DIM)))
    for attn in ("self_attn", "cross_attn"):
      for p in "qkvo":
        shapes += [(f"{b}.{attn}.{p}.weight", (DIM, DIM)), (f"{b}.{attn}.{p}.bias", (DIM,))]
      shapes += [(f"{b}.{attn}.norm_q.weight", (DIM,)), (f"{b}.{attn}.norm_k.weight", (DIM,))]
    shapes += [(f"{b}.norm3.weight", (DIM,)), (f"{b}.norm3.bias", (DIM,)),
               (f"{b}.ffn.0.weight", (FFN, DIM)), (f"{b}.ffn.0.bias", (FFN,)),
               (f"{b}.ffn.2.weight", (DIM, FFN)), (f"{b}.ffn.2.bias", (DIM,))]
  return shapes


def write_checkpoint(directory: str) -> str:
  shapes = wan_shapes()
  total = sum(int(np.prod(s)) for _, s in shapes)
  assert len(shapes) == 825 and total == WAN_PARAMS, (len(shapes), total)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump({"_class_name": "WanModel", "model_type": "t2v", "dim": DIM, "eps": 1e-6,
               "ffn_dim": FFN, "freq_dim": FREQ, "in_dim": CHANNELS, "num_heads": HEADS,
               "num_layers": LAYERS, "out_dim": CHANNELS, "text_len": 512}, f, indent=2)
  rng = np.random.default_rng(0)
  table = dict(shapes)
  path = os.path.join(directory, "diffusion_pytorch_model.safetensors")
  write_safetensors(path, [(n, s, "float32") for n, s in shapes],
                    lambda n: rng.standard_normal(table[n], dtype=np.float32) * 0.02)
  return path


CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
import jax
from configs import wan
from hybrid_video.weights import wan_dit
t_import = time.perf_counter()
c = wan.get_config(sys.argv[1])
c.weights.path = sys.argv[2]
params = wan_dit.load_params(c.model, c.weights)
jax.block_until_ready(params)
t1 = time.perf_counter()
n = sum(x.size for x in jax.tree.leaves(params))
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"load_s": t1 - t_import, "jax_import_s": t_import - t0, "params": int(n),
                  "cpu_s": usage.ru_utime + usage.ru_stime,
                  "peak_rss_bytes": usage.ru_maxrss * 1024}))
"""


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", default="/tmp/wan_bench", help="where the random checkpoint goes")
  parser.add_argument("--variant", default="wan1_3b", help="configs/wan.py variant to import into")
  parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
  args = parser.parse_args(argv)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    t0 = time.perf_counter()
    path = os.path.join(args.dir, "diffusion_pytorch_model.safetensors")
    if not os.path.isfile(path):
      write_checkpoint(args.dir)
    size = os.path.getsize(path)
    print(f"checkpoint {path}: {size / 1e9:.2f} GB (written in {time.perf_counter() - t0:.0f} s)")
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, args.variant, args.dir], cwd=root, env=env,
                         check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    result = json.loads(out.stdout.strip().splitlines()[-1])
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    load = os.getloadavg()[0]
    print(f"import into configs/wan.py:{args.variant}: {result['params']:,} parameters; "
          f"load_params {result['load_s']:.1f} s wall (process {wall:.1f} s, of which importing "
          f"jax {result['jax_import_s']:.1f} s; process CPU time {result['cpu_s']:.1f} s; load "
          f"average {load:.1f} on {os.cpu_count()} cores); peak RSS {rss / 1e9:.2f} GB = "
          f"{rss / size:.2f}x the file (targets: <= 60 s, <= 1.5x)")
  finally:
    if not args.keep:
      shutil.rmtree(args.dir, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
