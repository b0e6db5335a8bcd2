"""Streaming benchmark: per-chunk time and memory of each attention policy on one backbone.

Run (CPU default: the paper's horizon, 77 chunks of 3 latent frames, a few minutes on 2 cores):

  python main.py --mode=benchmark --config=configs/benchmark.py --workdir=runs/benchmark

Four times the paper's horizon (308 chunks; about 10-15 minutes on 2 CPU cores, one pass):

  python main.py --mode=benchmark --config=configs/benchmark.py --workdir=runs/benchmark_4x \
      --benchmark_chunks=308 --config.benchmark.repeats=1

Variants (`--config=configs/benchmark.py:VARIANT`):
  cpu       the default: a CPU-sized backbone whose softmax over a long K/V cache dominates
            (L = 3 frames x 8x8 tokens = 192 tokens per chunk, width 64, 4 layers)
  tiny      seconds, for tests
  wan1_3b   the Wan2.1-1.3B shapes (480x832 video: 60x104 latents, 1560 tokens per latent
            frame, 4680 per chunk); needs an accelerator, not run on CPU
  paper     the same shapes, predicted without executing anything (matmul FLOPs per chunk up
            to 84 chunks = 1005 frames, XLA's memory at 921 and 1005 frames) beside the paper's
            2.26x / -54% / 43 GB (hybrid_video/modes/benchmark_predict.py)

The model weights are a fresh initialisation: timing and memory do not depend on them.
Every policy runs on the same backbone (width, depth, tokens per chunk); they differ only in the
attention of each layer (see hybrid_video/modes/benchmark.py for the policy list).
"""

from __future__ import annotations

import ml_collections

from configs import default


def benchmark_config() -> ml_collections.ConfigDict:
  b = ml_collections.ConfigDict()
  b.num_chunks = 77            # chunks streamed per policy (was the --benchmark_chunks flag);
  #                              77 = the paper's 231 latent frames / 3 frames per chunk
  b.policies = ("softmax_full", "softmax_window", "arl2_50", "arl2_75", "arl2_100")  # policies
  #                              to run; names in hybrid_video/modes/benchmark.py POLICIES
  b.reference = "softmax_full"  # policy the speed-up and memory reduction are measured against
  b.candidate = "arl2_75"      # policy compared with the reference (the paper's 75% hybrid)
  b.sink_chunks = 1            # softmax_window: sink chunks always kept
  b.window_chunks = 7          # softmax_window: most recent chunks kept (cache = 8 chunks)
  b.repeats = 3                # timed passes over all chunks
  b.isolated_repeats = 1       # then passes of each policy alone (0 = none): its own alpha
  #                              without the others' growing caches in between
  b.statistic = "min"          # per-chunk time over the passes: "min" (other jobs only add
  #                              time) or "median"
  b.frame_hw = (32, 32)        # frame size fed to the model (latent size for wan1_3b)
  b.batch = 1                  # videos per stream (the paper's timing uses 1)
  b.cond_tokens = 1            # conditioning tokens per video (labels or text embeddings)
  b.paper_latent_frames = 231  # the paper's horizon: 921 video frames = 231 latent frames
  b.fit_start_fraction = 0.25  # alpha is fitted on chunks n >= fit_start_fraction * num_chunks
  b.seed = 0                   # model init seed and sampling seed
  b.predict = False            # predict at the model's shapes instead of running (FLOPs with
  #                              loop trips, XLA's memory; nothing executed; variant paper)
  b.blas_threads = 1           # BLAS/LAPACK threads during the run (0 = leave as is): jaxlib's
  #                              CPU LAPACK calls run in OpenBLAS, whose own threads stall
  #                              steps on a busy machine
  return b


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the benchmark config of variant `arg` (see module docstring)."""
  c = default.get_config("arl2")
  m = c.model
  m.frames_per_chunk = 3       # the paper's 3 latent frames per chunk
  m.patch_size = (1, 4, 4)     # 32x32 frames -> 8x8 = 64 tokens per frame, 192 per chunk
  m.dim = 64
  m.num_heads = 2              # head dim 32
  m.mlp_dim = 256
  m.num_layers = 4             # 50% / 75% / 100% hybrid = 2 / 3 / 4 layers
  m.gdn_chunk_size = 64        # the sub-chunk the documented benchmark runs used
  c.sampler.cache_chunks = 1   # unbounded caches start at 1 chunk and double: one compile each
  c.sampler.kind = "few_step"  # the paper's sampler: 4 denoising passes + 1 context pass
  c.sampler.shift = 5.0
  c.benchmark = benchmark_config()
  variant = arg or "cpu"
  if variant == "cpu":
    pass
  elif variant == "tiny":
    m.frames_per_chunk = 1
    m.dim = 32
    m.num_heads = 2
    m.mlp_dim = 64
    m.num_layers = 4
    c.sampler.timesteps = (1000, 500)
    c.benchmark.frame_hw = (16, 16)
    c.benchmark.num_chunks = 12
    c.benchmark.repeats = 1
    c.benchmark.window_chunks = 3
  elif variant == "paper":       # the paper's comparison predicted, nothing executed
    c.model = default.wan1_3b_model()
    c.sampler = default.wan1_3b_sampler(c.sampler)
    c.benchmark.frame_hw = (60, 104)
    c.benchmark.cond_tokens = 512
    c.benchmark.num_chunks = 84  # 252 latent frames = 1005 video frames
    c.benchmark.predict = True
  elif variant == "wan1_3b":
    c.model = default.wan1_3b_model()
    c.sampler = default.wan1_3b_sampler(c.sampler)
    c.sampler.cache_chunks = 1
    c.benchmark.frame_hw = (60, 104)
    c.benchmark.cond_tokens = 512  # umT5 text length in Wan
  else:
    raise ValueError(f"unknown benchmark variant {variant!r}; choose cpu, tiny, wan1_3b, paper")
  return c
