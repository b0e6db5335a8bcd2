"""--mode=benchmark: per-chunk time and memory of each attention policy on one backbone.

(One file, ~480 lines: the policies, the interleaved timing loop and its summary are one
measurement protocol; the report is benchmark_report.py.)

Policies: hybrid_video/modes/benchmark_policies.py (full caches grow by doubling here: one
compile each). benchmark.predict=True predicts the comparison at the paper's shapes instead,
executing nothing (hybrid_video/modes/benchmark_predict.py, configs/benchmark.py:paper).

Timing. Every cache capacity a policy will use is compiled (and run once) before any timing:
"warm every capacity first". The timed passes then build no executable; this is checked and
recorded (`compiles_during_timing`). The policies are interleaved chunk by chunk, the order
rotating with the chunk index and the pass, so machine noise hits them alike. With R passes a
chunk's time is the minimum over passes (benchmark.statistic; or "median"): other jobs on the
machine only ever add time, and the passes are minutes apart. A chunk's time is the jitted
sampler step (every denoising pass and the context pass) until its frames are on the host, as in
`StreamingSampler.stream`; growing the cache (a pad, at doublings only) is timed separately.

Memory per chunk: the carry's bytes (K/V caches and states) after the chunk; the step's
footprint from XLA's memory analysis of the executable in use (arguments + outputs - aliased +
temporaries: parameters, carry and peak activations), which is per policy on any back-end; and,
for context, the process's RSS and the device's memory stats where the back-end has them
(shared by all policies, since they run interleaved in one process).

Exponent. alpha is the least-squares slope of log(seconds) against log(n + 1) over chunks
n >= fit_start_fraction * N (default: the last three quarters), n counting from 0, so n + 1 is
the number of chunks in the video. A constant per-chunk cost gives 0, a cost linear in the
history gives 1; the first chunks, where fixed costs hide the attention, are left out. It is
fitted three ways: `fit` on the interleaved times (where the growing caches of the other
policies also slow a constant-cost policy down a little), `fit_isolated` on passes of each
policy alone after the interleaved ones (benchmark.isolated_repeats), and `fit_flops` on the
matmul FLOPs of the step each chunk ran, counted from its jaxpr with every loop trip
(deterministic: the work itself; XLA's cost analysis counts a loop body once, so it misses the
blocked cache sweep; its figures stay in the JSON as `cost_analysis_by_capacity`).

Horizon. The paper times 921 video frames = 231 latent frames, in chunks of 3 latent frames:
77 chunks. With F latent frames per benchmark chunk the same horizon is ceil(231 / F) chunks
(F = 3 in configs/benchmark.py, so 77); speed-up (total time of chunks < H) and memory reduction
(footprint at chunk H - 1) are reported there and at 4H when the run is that long.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from hybrid_video.modes import benchmark_predict, benchmark_report
from hybrid_video.modes.benchmark_policies import POLICIES, policy_model_config
from hybrid_video.streaming import ChunkRunner
from hybrid_video.xla_analysis import generate_analysis
from hybrid_video.errors import UserError
from hybrid_video.nn.model import CausalDiT, carry_bytes, count_params
from hybrid_video.run_info import (blas_info, blas_threads_limit, device_memory, hardware_info,
                                   peak_rss_bytes, provenance, rss_bytes)


# The benchmark's targets (issue 7; the paper's Table for 75%).
TARGETS = {
    "hybrid100_abs_alpha_max": 0.05,
    "softmax_alpha_range": (0.8, 1.2),
    "speedup_min": 2.26,
    "memory_reduction_min": 0.54,
}


# -- pieces ----------------------------------------------------------------------------------------


def paper_horizon_chunks(frames_per_chunk: int, paper_latent_frames: int = 231) -> int:
  """Chunks of `frames_per_chunk` latent frames covering the paper's horizon."""
  return math.ceil(paper_latent_frames / frames_per_chunk)


def fit_exponent(seconds, start: int | None = None, start_fraction: float = 0.25) -> dict:
  """Slope alpha of log(seconds[n]) vs log(n + 1) over n in [start, len) (least squares).

  start defaults to max(1, round(start_fraction * len)). Returns alpha, the prefactor
  (the fitted value at n + 1 = 1, in the input's units), r2 and the chunk range used.
  """
  t = np.asarray(seconds, np.float64)
  n = len(t)
  if start is None:
    start = max(1, int(round(start_fraction * n)))
  if n - start < 2:
    raise UserError(f"need at least 2 chunks to fit alpha, got chunks {start}..{n - 1}")
  if np.any(t[start:] <= 0):
    raise UserError("per-chunk times must be positive to fit alpha")
  x = np.log(np.arange(start, n, dtype=np.float64) + 1.0)
  y = np.log(t[start:])
  alpha, intercept = np.polyfit(x, y, 1)
  resid = y - (alpha * x + intercept)
  ss = float(np.sum((y - y.mean()) ** 2))
  r2 = 1.0 - float(np.sum(resid ** 2)) / ss if ss > 0 else 1.0
  return {"alpha": float(alpha), "prefactor": float(np.exp(intercept)), "r2": r2,
          "first_chunk": int(start), "last_chunk": int(n - 1)}


def _condition(model_cfg, batch: int, tokens: int):
  if model_cfg.cond == "labels":
    return jnp.zeros((batch, tokens), jnp.int32)
  if model_cfg.cond == "embeddings":
    return jnp.zeros((batch, tokens, int(model_cfg.text_dim)), jnp.float32)
  return None


def _param_bytes(model: CausalDiT) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


# -- the run ---------------------------------------------------------------------------------------


class _Policy:
  """One policy's runner, inputs and raw figures."""

  def __init__(self, name: str, config, bcfg):
    self.name = name
    self.model_cfg = policy_model_config(config.model, name, bcfg)
    model = CausalDiT(self.model_cfg, rngs=nnx.Rngs(int(bcfg.seed)))
    self.runner = ChunkRunner(model, config.sampler, batch=int(bcfg.batch),
                              frame_hw=tuple(bcfg.frame_hw))
    self.context = self.runner.embed(_condition(self.model_cfg, int(bcfg.batch),
                                                int(bcfg.cond_tokens)))
    self.key = jax.random.key(int(bcfg.seed))
    self.memory_by_capacity: dict[int, dict] = {}
    self.cost_by_capacity: dict[int, dict] = {}
    self.compile_seconds: dict[int, float] = {}
    self.seconds: list[list[float]] = []    # [pass][chunk], interleaved passes
    self.isolated_seconds: list[list[float]] = []  # [pass][chunk], this policy alone
    self.grow_seconds: list[list[float]] = []
    self.carry_bytes: list[int] = []
    self.capacity: list[int] = []
    self.rss_bytes: list[int | None] = []
    self.device_memory: list[dict | None] = []
    self.carry = None

  @property
  def model(self) -> CausalDiT:
    return self.runner.model

  def warm_up(self, num_chunks: int):
    """Compile and run once every capacity the stream will use; grow once into each."""
    previous = None
    for cap in self.runner.capacities(num_chunks):
      if previous is not None:  # the pads of grow_carry compile per shape too
        jax.block_until_ready(self.runner.reserve(self.runner.init_carry(previous), previous))
      carry = self.runner.init_carry(cap)
      slots = int(carry["slot_chunk"].shape[0])  # 0 without softmax layers
      t0 = time.perf_counter()  # compile (inside generate_memory) + first run
      self.memory_by_capacity[slots], self.cost_by_capacity[slots] = (
          generate_analysis(self.runner, carry, self.key, self.context))
      carry, frames = self.runner.generate(carry, self.key, self.context)
      jax.block_until_ready(frames)
      self.compile_seconds[slots] = time.perf_counter() - t0
      del carry
      previous = cap

  def start_pass(self):
    self.carry = self.runner.init_carry()
    self.seconds.append([])
    self.grow_seconds.append([])

  def isolated_pass(self, num_chunks: int):
    """Every chunk of one stream with no other policy in between (timing only)."""
    self.start_pass()
    for n in range(num_chunks):
      self.run_chunk(n, record_memory=False)
    self.isolated_seconds.append(self.seconds.pop())
    self.grow_seconds.pop()
    self.carry = None

  def run_chunk(self, n: int, record_memory: bool):
    t0 = time.perf_counter()
    carry = self.runner.reserve(self.carry, n)
    jax.block_until_ready(carry)
    t1 = time.perf_counter()
    self.carry, frames = self.runner.generate(carry, self.key, self.context)
    np.asarray(frames)  # blocks until the chunk is on the host, as the sampler does
    t2 = time.perf_counter()
    self.seconds[-1].append(t2 - t1)
    self.grow_seconds[-1].append(t1 - t0)
    if record_memory:
      self.carry_bytes.append(carry_bytes(self.carry))
      cap = int(self.carry["slot_chunk"].shape[0])
      self.capacity.append(cap)
      self.rss_bytes.append(rss_bytes())
      self.device_memory.append(device_memory())

  def footprint_bytes(self) -> list[int]:
    return [self.memory_by_capacity[c].get("footprint", 0) for c in self.capacity]

  def flops(self) -> list[float]:
    return [self.cost_by_capacity[c].get("matmul_flops", 0.0) for c in self.capacity]


def run_benchmark(config, *, num_chunks: int | None = None, progress: bool = True) -> dict:
  """Runs every policy of config.benchmark; returns the raw figures and the summary (JSON-able)."""
  bcfg = config.benchmark
  n_chunks = int(bcfg.num_chunks if num_chunks is None else num_chunks)
  if n_chunks < 3:
    raise UserError(f"benchmark needs at least 3 chunks, got {n_chunks}")
  if bcfg.statistic not in ("min", "median"):
    raise UserError(f"benchmark.statistic={bcfg.statistic!r} must be 'min' or 'median'")
  repeats = int(bcfg.repeats)
  if repeats < 1:
    raise UserError(f"benchmark.repeats={repeats} must be >= 1")
  names = list(bcfg.policies)
  unknown = [n for n in names if n not in POLICIES]
  if unknown:
    raise UserError(f"unknown benchmark policies {unknown}; choose from {sorted(POLICIES)}")
  for name in (bcfg.reference, bcfg.candidate):
    if name not in names:
      raise UserError(f"benchmark policy {name!r} (reference/candidate) is not in "
                      f"benchmark.policies={names}")
  with blas_threads_limit(int(bcfg.blas_threads)):
    return _run(config, names, n_chunks, repeats, progress)


def _run(config, names, n_chunks: int, repeats: int, progress: bool) -> dict:
  bcfg = config.benchmark
  policies = [_Policy(name, config, bcfg) for name in names]
  blas = blas_info()
  t_start = time.perf_counter()
  warm = tqdm(policies, desc="compiling", disable=not progress)
  for p in warm:
    warm.set_postfix(policy=p.name)
    p.warm_up(n_chunks)
  compiles_after_warmup = {p.name: p.runner.compiles for p in policies}
  bar = tqdm(total=repeats * n_chunks, desc="timing", unit="chunk", disable=not progress)
  gc.collect()
  gc.disable()  # a collection inside a timed chunk would land on one policy only
  try:
    for r in range(repeats):
      for p in policies:
        p.start_pass()
      for n in range(n_chunks):
        shift = (n + r) % len(policies)
        for p in policies[shift:] + policies[:shift]:
          p.run_chunk(n, record_memory=(r == 0))
        bar.update(1)
    for p in policies:
      p.carry = None
    # Alone, a policy's time per chunk is not pushed up by the others' growing caches (memory
    # traffic, allocator): the cleaner view of its own growth exponent.
    for r in range(int(bcfg.isolated_repeats)):
      for p in (policies if r % 2 == 0 else policies[::-1]):
        p.isolated_pass(n_chunks)
  finally:
    gc.enable()
    bar.close()
  wall = time.perf_counter() - t_start
  results = summarize(config, policies, n_chunks, compiles_after_warmup, wall)
  results["hardware"]["blas_threadpools"] = blas
  results["provenance"] = provenance()
  return results


def _statistic(passes: list[list[float]], statistic: str) -> list[float] | None:
  if not passes:
    return None
  a = np.asarray(passes, np.float64)
  return (a.min(axis=0) if statistic == "min" else np.median(a, axis=0)).tolist()


def _horizon_comparison(ref: dict, cand: dict, horizon: int) -> dict | None:
  if horizon > len(ref["chunk_seconds"]):
    return None
  t_ref = float(np.sum(ref["chunk_seconds"][:horizon]))
  t_cand = float(np.sum(cand["chunk_seconds"][:horizon]))
  m_ref, m_cand = ref["footprint_bytes"][horizon - 1], cand["footprint_bytes"][horizon - 1]
  c_ref, c_cand = ref["carry_bytes"][horizon - 1], cand["carry_bytes"][horizon - 1]
  return {
      "chunks": horizon,
      "reference_seconds": t_ref,
      "candidate_seconds": t_cand,
      "speedup": t_ref / t_cand,
      "reference_footprint_bytes": m_ref,
      "candidate_footprint_bytes": m_cand,
      "memory_reduction": 1.0 - m_cand / m_ref if m_ref else None,
      "reference_carry_bytes": c_ref,
      "candidate_carry_bytes": c_cand,
      "carry_reduction": 1.0 - c_cand / c_ref if c_ref else None,
      "last_chunk_speedup": (ref["chunk_seconds"][horizon - 1]
                             / cand["chunk_seconds"][horizon - 1]),
  }


def summarize(config, policies, n_chunks: int, compiles_after_warmup: dict, wall: float) -> dict:
  bcfg = config.benchmark
  f = int(config.model.frames_per_chunk)
  horizon = paper_horizon_chunks(f, int(bcfg.paper_latent_frames))
  per_policy = {}
  for p in policies:
    seconds = np.asarray(p.seconds, np.float64)  # [R, N]
    median = np.median(seconds, axis=0)
    minimum = seconds.min(axis=0)
    used = minimum if bcfg.statistic == "min" else median
    fp, hp, wp = p.model.chunk_grid(tuple(bcfg.frame_hw))
    per_policy[p.name] = {
        "hybrid_layers": list(p.model.hybrid_layers),
        "softmax_layers": list(p.model.softmax_layers),
        "sink_chunks": p.model.sink_chunks,
        "window_chunks": p.model.window_chunks,
        "params": int(count_params(p.model)),
        "param_bytes": _param_bytes(p.model),
        "tokens_per_chunk": fp * hp * wp,
        "compiles": p.runner.compiles,
        "compiles_during_timing": p.runner.compiles - compiles_after_warmup[p.name],
        "capacities": sorted(p.memory_by_capacity),
        "compile_seconds_by_capacity": {str(k): v for k, v in p.compile_seconds.items()},
        "memory_analysis_by_capacity": {str(k): v for k, v in p.memory_by_capacity.items()},
        "cost_analysis_by_capacity": {str(k): v for k, v in p.cost_by_capacity.items()},
        "flops_per_chunk": p.flops(),
        "chunk_seconds": used.tolist(),  # the per-chunk statistic every summary uses
        "chunk_seconds_median": median.tolist(),
        "chunk_seconds_min": minimum.tolist(),
        "chunk_seconds_passes": seconds.tolist(),  # [pass][chunk], raw
        "grow_seconds": np.asarray(p.grow_seconds).tolist(),
        "capacity_chunks": p.capacity,
        "carry_bytes": p.carry_bytes,
        "footprint_bytes": p.footprint_bytes(),
        "rss_bytes": p.rss_bytes,
        "device_memory": p.device_memory if any(d for d in p.device_memory) else None,
        "constant_carry": len(set(p.carry_bytes)) == 1,
        "total_seconds": float(used.sum()),
        "isolated_chunk_seconds": _statistic(p.isolated_seconds, bcfg.statistic),
        "isolated_chunk_seconds_passes": p.isolated_seconds,
        "fit_isolated": (fit_exponent(_statistic(p.isolated_seconds, bcfg.statistic),
                                      start_fraction=float(bcfg.fit_start_fraction))
                         if p.isolated_seconds else None),
        "fit": fit_exponent(used, start_fraction=float(bcfg.fit_start_fraction)),
        # The same fit on the matmul FLOPs of each chunk's step: the work, without noise.
        "fit_flops": (fit_exponent(p.flops(), start_fraction=float(bcfg.fit_start_fraction))
                      if all(f > 0 for f in p.flops()) else None),
    }
  ref, cand = per_policy[bcfg.reference], per_policy[bcfg.candidate]
  comparisons = {label: _horizon_comparison(ref, cand, h)
                 for label, h in (("paper_horizon", horizon), ("4x_paper_horizon", 4 * horizon))}
  targets = _check_targets(per_policy, comparisons["paper_horizon"])
  first = policies[0].model
  fp, hp, wp = first.chunk_grid(tuple(bcfg.frame_hw))
  return {
      "hardware": hardware_info(),
      "config": json.loads(config.to_json_best_effort()),
      "backbone": {
          "dim": first.dim, "num_layers": len(first.blocks), "num_heads": first.num_heads,
          "head_dim": first.head_dim, "mlp_dim": int(config.model.mlp_dim),
          "frames_per_chunk": f, "tokens_per_frame": hp * wp, "tokens_per_chunk": fp * hp * wp,
          "frame_hw": list(bcfg.frame_hw), "batch": int(bcfg.batch),
          "sampler_passes_per_chunk": len(config.sampler.timesteps) + 1
          if config.sampler.kind == "few_step" else int(config.sampler.num_steps) + 1,
      },
      "horizon": {
          "paper_latent_frames": int(bcfg.paper_latent_frames),
          "paper_video_frames": 4 * (int(bcfg.paper_latent_frames) - 1) + 1,
          "frames_per_chunk": f,
          "paper_horizon_chunks": horizon,
          "mapping": (f"{bcfg.paper_latent_frames} latent frames (the paper's 921 video frames, "
                      f"Wan VAE: 4x temporal compression + 1) / {f} latent frames per chunk "
                      f"= {horizon} chunks; 4x = {4 * horizon} chunks"),
          "num_chunks_run": n_chunks,
      },
      "method": {
          "timing": ("every cache capacity compiled and run once before timing (warm every "
                     "capacity first); policies interleaved chunk by chunk with a rotating "
                     f"order; {len(policies[0].seconds)} timed pass(es), per-chunk time = "
                     f"{bcfg.statistic} over passes; grow (pad) time recorded separately; then "
                     f"{len(policies[0].isolated_seconds)} pass(es) of each policy alone"),
          "alpha_fit": ("least squares of log(seconds) on log(n + 1) over chunks n >= "
                        f"{bcfg.fit_start_fraction} * num_chunks (n from 0); fit_flops: the "
                        "same on the matmul FLOPs of the step each chunk ran, counted from its "
                        "jaxpr with every loop trip"),
          "speedup": "sum of per-chunk seconds over chunks < H, reference / candidate",
          "memory": ("footprint = XLA memory analysis of the step executable in use at chunk "
                     "H - 1 (arguments + outputs - aliased + temporaries); carry = K/V caches "
                     "and states; rss/device stats are process-wide (policies interleaved)"),
      },
      "reference": bcfg.reference,
      "candidate": bcfg.candidate,
      "statistic": bcfg.statistic,
      "policies": per_policy,
      "comparisons": comparisons,
      "targets": targets,
      "process": {"peak_rss_bytes": peak_rss_bytes(), "device_memory": device_memory(),
                  "wall_seconds": wall},
  }


FITS = (("fit", ""), ("fit_isolated", "_isolated"), ("fit_flops", "_flops"))


def _check_targets(per_policy: dict, paper: dict | None) -> dict:
  """Each target against each measurement of it: interleaved wall time, isolated wall time,
  matmul FLOPs; the memory target against the step footprint and against the carry alone."""
  out = {}
  h100 = per_policy.get("arl2_100")
  if h100 is not None:
    bound = TARGETS["hybrid100_abs_alpha_max"]
    for key, suffix in FITS:
      if h100.get(key):
        a = abs(h100[key]["alpha"])
        out[f"arl2_100_abs_alpha{suffix}"] = {"value": a, "target": f"<= {bound}",
                                              "met": a <= bound}
    out["arl2_100_constant_carry"] = {"value": h100["constant_carry"], "target": "True",
                                      "met": bool(h100["constant_carry"])}
    out["arl2_100_compiles"] = {"value": h100["compiles"], "target": "1",
                                "met": h100["compiles"] == 1}
  full = per_policy.get("softmax_full")
  if full is not None:
    lo, hi = TARGETS["softmax_alpha_range"]
    for key, suffix in FITS:
      if full.get(key):
        a = full[key]["alpha"]
        out[f"softmax_full_alpha{suffix}"] = {"value": a, "target": f"~1 ({lo}..{hi})",
                                              "met": lo <= a <= hi}
  if paper is not None:
    out["speedup_at_paper_horizon"] = {
        "value": paper["speedup"], "target": f">= {TARGETS['speedup_min']}",
        "met": paper["speedup"] >= TARGETS["speedup_min"]}
    for key, label in (("memory_reduction", "memory_reduction_at_paper_horizon"),
                       ("carry_reduction", "carry_reduction_at_paper_horizon")):
      red = paper[key]
      out[label] = {"value": red, "target": f">= {TARGETS['memory_reduction_min']}",
                    "met": red is not None and red >= TARGETS["memory_reduction_min"]}
  return out


# -- main ------------------------------------------------------------------------------------------


def benchmark_main(config, workdir: str, *, overrides=None) -> dict:
  """--mode=benchmark: run, then write <workdir>/benchmark/{benchmark.json, *.png} and print."""
  if "benchmark" not in config:
    raise UserError("--mode=benchmark needs a benchmark config: "
                    "--config=configs/benchmark.py[:cpu|tiny|wan1_3b|paper]")
  out_dir = os.path.join(workdir, "benchmark")
  os.makedirs(out_dir, exist_ok=True)
  if config.benchmark.get("predict", False):  # nothing executed: benchmark_predict.py
    results = benchmark_predict.predict(config, progress=bool(config.progress))
    path = os.path.join(out_dir, "prediction.json")
    with open(path, "w") as f:
      json.dump(results, f, indent=1)
    print(benchmark_predict.table(results))
    print(f"wrote {path}")
    return results
  results = run_benchmark(config, progress=bool(config.progress))
  results["plots"] = benchmark_report.plot(results, out_dir)
  path = os.path.join(out_dir, "benchmark.json")
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  results["json"] = path
  print(benchmark_report.table(results))
  print(f"wrote {path} and {', '.join(results['plots'])}")
  return results
