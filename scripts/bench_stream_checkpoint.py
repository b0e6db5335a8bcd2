"""Overhead of stream checkpoints (--mode=sample): time per saved chunk against time per
generated chunk on the default config, and the Wan-sized carry computed abstractly with an
estimated save time.

  .venv/bin/python -m scripts.bench_stream_checkpoint [--chunks 8] [--saves 8] [--mib 256]

1. Default config (configs/default.py, random parameters): the sampler step per chunk (after the
   compile), and StreamCheckpointer.save of its carry: the blocking part (device -> host copy;
   what the stream waits for) and the whole save (files written, renamed into place).
2. Save throughput on a `--mib` MiB carry of random float32 K/V-cache-shaped arrays.
3. configs/default.py:wan1_3b: jax.eval_shape of the model's init_carry on 480x832 video (60x104
   latents) at the initial cache, after one minute of video (the unbounded cache doubles), with
   a sink 1 + window 8 bounded cache and for a 100%-hybrid model; save time = bytes / the
   measured throughput.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.default import get_config
from hybrid_video import inputs as inputs_lib
from hybrid_video import stream_state
from hybrid_video.nn.model import abstract_model, carry_bytes
from hybrid_video.streaming import StreamingSampler

WAN_LATENT_HW = (60, 104)  # 480x832 pixels / VAE stride 8
WAN_FPS, WAN_TIME_STRIDE = 16, 4


def random_model(model_cfg, seed: int = 0):
  """The model with numpy-drawn parameters (no per-shape compiles; the values do not matter)."""
  graphdef, abstract = nnx.split(abstract_model(model_cfg))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda s: jnp.asarray(
      (0.05 * rng.standard_normal(s.shape)).astype(s.dtype)), abstract)
  return nnx.merge(graphdef, state)


def _timed(fn, repeats: int) -> list[float]:
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return out


def bench_default(chunks: int, saves: int, directory: str) -> dict:
  cfg = get_config()
  runner = StreamingSampler(random_model(cfg.model), cfg.sampler, batch=1,
                            frame_hw=inputs_lib.frame_hw(cfg))
  key, context = runner.prepare(0, jnp.array([[3]]))
  carry = runner.init_carry()
  carry, frames = runner.generate(carry, key, context)  # compile
  jax.block_until_ready(frames)
  gen = []
  for _ in range(chunks):  # within the initial cache capacity: no growth, no recompile
    t0 = time.perf_counter()
    carry, frames = runner.generate(carry, key, context)
    np.asarray(frames)
    gen.append(time.perf_counter() - t0)
  ckpt = stream_state.StreamCheckpointer(os.path.join(directory, "default.stream"), keep=3)
  block, whole = [], []
  for i in range(saves):
    t0 = time.perf_counter()
    ckpt.save(i + 1, carry, key, {"fingerprint": {}, "chunk": i + 1})
    block.append(time.perf_counter() - t0)
    ckpt.wait()
    whole.append(time.perf_counter() - t0)
  ckpt.close()
  return {"gen": float(np.median(gen)), "block": float(np.median(block)),
          "whole": float(np.median(whole)), "bytes": carry_bytes(carry),
          "every": int(cfg.sampler.checkpoint_every)}


def bench_throughput(mib: int, directory: str) -> float:
  """Bytes/s of a whole save of a `mib` MiB carry (random data: no compression shortcut)."""
  rng = np.random.default_rng(0)
  n = mib * 2**20 // 4 // 8  # 8 arrays of float32
  carry = {"layers": tuple({"k": jnp.asarray(rng.standard_normal(n, np.float32))}
                           for _ in range(8)),
           "slot_chunk": jnp.zeros((1,), jnp.int32), "chunk": jnp.zeros((), jnp.int32)}
  ckpt = stream_state.StreamCheckpointer(os.path.join(directory, "big.stream"), keep=1)
  times = []
  for i in range(2):
    t0 = time.perf_counter()
    ckpt.save(i + 1, carry, jax.random.key(0), {"fingerprint": {}, "chunk": i + 1})
    ckpt.wait()
    times.append(time.perf_counter() - t0)
  ckpt.close()
  return carry_bytes(carry) / min(times)


def wan_carries() -> dict[str, int]:
  """Carry bytes of the Wan-sized model (abstract: nothing is allocated)."""
  cfg = get_config("wan1_3b")
  model = abstract_model(cfg.model)
  f = int(cfg.model.frames_per_chunk)
  minute_chunks = math.ceil((1 + 60 * WAN_FPS // WAN_TIME_STRIDE) / f)
  cap = int(cfg.sampler.cache_chunks)
  while cap < minute_chunks:
    cap *= 2

  def nbytes(m, capacity):
    return carry_bytes(jax.eval_shape(lambda: m.init_carry(1, WAN_LATENT_HW, capacity)))

  out = {f"75% hybrid, initial cache ({cfg.sampler.cache_chunks} chunks)":
         nbytes(model, int(cfg.sampler.cache_chunks)),
         f"75% hybrid, after 1 min of video ({minute_chunks} chunks -> {cap} slots)":
         nbytes(model, cap)}
  bounded = get_config("wan1_3b").model
  bounded.kv_cache.sink_chunks, bounded.kv_cache.window_chunks = 1, 8
  out["75% hybrid, sink 1 + window 8 chunks (any length)"] = nbytes(abstract_model(bounded), 9)
  hybrid100 = get_config("wan1_3b").model
  hybrid100.hybrid.ratio = 1.0
  out["100% hybrid (any length)"] = nbytes(abstract_model(hybrid100), 0)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--chunks", type=int, default=6, help="generated chunks timed")
  parser.add_argument("--saves", type=int, default=6, help="saves timed")
  parser.add_argument("--mib", type=int, default=256, help="size of the throughput carry")
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind}, {jax.device_count()} device(s)")
  with tempfile.TemporaryDirectory() as tmp:
    d = bench_default(args.chunks, args.saves, tmp)
    rate = bench_throughput(args.mib, tmp)
  print(f"default config (configs/default.py), carry {d['bytes'] / 2**10:.1f} KiB:")
  print(f"  generate: {1e3 * d['gen']:8.1f} ms per chunk (median of {args.chunks})")
  print(f"  save:     {1e3 * d['block']:8.1f} ms blocking (device->host), "
        f"{1e3 * d['whole']:.1f} ms to the renamed checkpoint (median of {args.saves})")
  print(f"  overhead at sampler.checkpoint_every={d['every']}: "
        f"{100 * d['block'] / (d['every'] * d['gen']):.1f}% of generation time blocking, "
        f"{100 * d['whole'] / (d['every'] * d['gen']):.1f}% if the write were synchronous")
  print(f"save throughput ({args.mib} MiB carry, whole save): {rate / 2**20:.0f} MiB/s")
  print("Wan2.1-1.3B-sized carry (configs/default.py:wan1_3b, 480x832, abstract):")
  for name, n in wan_carries().items():
    print(f"  {name:<58} {n / 2**30:8.3f} GiB  est. save {n / rate:7.2f} s")


if __name__ == "__main__":
  main()
