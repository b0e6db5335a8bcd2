"""Wan VAE streaming-decode benchmark.

  .venv/bin/python -m scripts.bench_vae                  # both parts, on the default backend
  JAX_PLATFORMS=cpu .venv/bin/python -m scripts.bench_vae --chunks=100

(a) tiny config (VAEConfig.tiny(), random weights): decodes `--chunks` chunks of 3 latents after
    the two compiling chunks, times each one, and fits per-chunk time ~ index^alpha on a log-log
    scale (target |alpha| <= 0.05: the cost of a chunk does not grow with the video); prints the
    cache bytes, which must not change.
(b) released config (base_dim 96, z_dim 16) at 480 x 832 (latents 60 x 104): lowers and compiles
    ONE later-chunk decode step of 3 latents on abstract shapes (no weights allocated) and prints
    XLA's memory analysis (argument / output / temporary bytes).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybrid_video.nn.vae import VAE, StreamingVAE, VAEConfig, cache_bytes

GIB = 2.0 ** 30


def fit_alpha(times: list[float]) -> float:
  """Slope of log(time) against log(chunk index), indices 1..n."""
  idx = np.arange(1, len(times) + 1)
  return float(np.polyfit(np.log(idx), np.log(np.asarray(times)), 1)[0])


def bench_tiny(chunks: int, latent_hw: tuple[int, int], chunk: int = 3) -> None:
  vae = VAE(VAEConfig.tiny(), rngs=nnx.Rngs(0))
  codec = StreamingVAE(vae)
  h, w = latent_hw
  latents = jax.random.normal(jax.random.key(0), (1, chunk * (chunks + 2), h, w, 4))
  cache = codec.init_decode_cache(1, h, w)
  times, cpu_times, sizes = [], [], set()
  for n in range(chunks + 2):
    start, cpu_start = time.perf_counter(), time.process_time()
    frames, cache = codec.decode_chunk(cache, latents[:, chunk * n:chunk * (n + 1)])
    frames.block_until_ready()
    if n >= 2:  # chunks 0 and 1 compile the first and the later step
      times.append(time.perf_counter() - start)
      cpu_times.append(time.process_time() - cpu_start)
    sizes.add(cache_bytes(cache))
  t, cpu = np.asarray(times) * 1e3, np.asarray(cpu_times) * 1e3
  print(f"(a) tiny VAE on {jax.default_backend()}: {chunks} chunks of {chunk} latents "
        f"({h}x{w} -> {frames.shape[2]}x{frames.shape[3]}, {frames.shape[1]} frames per chunk)")
  print(f"    per-chunk ms: median {np.median(t):.2f}, first-10 mean {t[:10].mean():.2f}, "
        f"last-10 mean {t[-10:].mean():.2f}, min {t.min():.2f}, max {t.max():.2f}; "
        f"process CPU ms median {np.median(cpu):.2f}")
  # Process CPU time as well: on a shared machine wall time also measures the neighbours.
  print(f"    alpha (log time vs log chunk index): wall {fit_alpha(times):+.4f}, "
        f"process CPU {fit_alpha(cpu_times):+.4f}")
  print(f"    cache bytes per chunk: {sorted(sizes)} ({len(cache.convs)} arrays); "
        f"traces {dict(codec.traces)}")


def bench_full(height: int, width: int, chunk: int = 3, dtype=jnp.float32) -> None:
  config = VAEConfig()
  abstract = nnx.eval_shape(lambda: VAE(config, rngs=nnx.Rngs(0), dtype=dtype))
  graphdef, state = nnx.split(abstract)
  h, w = height // config.space_factor, width // config.space_factor
  cache = abstract.decode_cache_spec(1, h, w, first=False)
  latents = jax.ShapeDtypeStruct((1, chunk, h, w, config.z_dim), jnp.float32)

  def step(state, cache, latents):
    return nnx.merge(graphdef, state).decode_chunk(cache, latents)

  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(1,)).lower(state, cache, latents).compile()
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
  print(f"(b) released VAE ({params / 1e6:.1f} M params, compute {jnp.dtype(dtype).name}) on "
        f"{jax.default_backend()}: one later-chunk decode step, {chunk} latents {h}x{w} -> "
        f"{4 * chunk} frames {height}x{width}; lower+compile {seconds:.1f} s")
  print(f"    cache: {len(cache.convs)} arrays, {cache_bytes(cache) / GIB:.3f} GiB")
  if mem is None:
    print("    memory analysis: not available on this backend")
    return
  for name in ("argument", "output", "temp", "alias", "generated_code"):
    value = getattr(mem, f"{name}_size_in_bytes", None)
    if value is not None:
      print(f"    {name:>14} bytes: {value:>14,d} ({value / GIB:.3f} GiB)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--chunks", type=int, default=100)
  parser.add_argument("--tiny_hw", type=int, nargs=2, default=(4, 6))
  parser.add_argument("--height", type=int, default=480)
  parser.add_argument("--width", type=int, default=832)
  parser.add_argument("--bf16", action="store_true", help="(b) with bf16 compute")
  parser.add_argument("--skip_tiny", action="store_true")
  parser.add_argument("--skip_full", action="store_true")
  args = parser.parse_args()
  if not args.skip_tiny:
    bench_tiny(args.chunks, tuple(args.tiny_hw))
  if not args.skip_full:
    bench_full(args.height, args.width, dtype=jnp.bfloat16 if args.bf16 else jnp.float32)


if __name__ == "__main__":
  main()
