"""--mode=benchmark with benchmark.predict=True: the paper's comparison predicted at its shapes,
executing nothing (configs/benchmark.py:paper, Wan2.1-1.3B at 480x832, 3-latent-frame chunks).

For every policy (softmax_full, softmax_window, arl2_50/75/100; hybrid_video/modes/benchmark.py)
and every chunk n < benchmark.num_chunks (84 = 252 latent frames = 1005 video frames):
  - work: the matmul FLOPs of the sampler step (every denoising pass and the context pass)
    against a K/V cache holding exactly the n chunks before it (window policies: at most
    sink + window), counted from the traced step with every loop trip
    (hybrid_video/flop_count.py). The count is affine in the keys the XLA cache attention
    sweeps (the cache length rounded up to whole key blocks), so it is traced at three lengths
    and the third checks the line;
  - memory: XLA's per-device footprint (arguments + outputs - aliased + temporaries: parameters,
    carry and activations) of the step compiled on one device at the cache lengths of the
    paper's two horizons (921 and 1005 frames).
Predicted speed-up at a horizon = total FLOPs of the reference's chunks / the candidate's (a
step time proportional to its matmul work); memory reduction = 1 - footprint ratio.

Where the prediction and the paper should differ: the paper times real GPU kernels (FlashAttention,
FLA's Triton kernels), whose time is not proportional to FLOPs (the GDN scans and the elementwise
work of a step are memory-bound, and fixed per-step overheads do not shrink); the paper's softmax
baseline is Causal-Forcing's own code, our policies share one backbone; CPU XLA's buffer
assignment estimates GPU memory and does not include the framework's allocator overheads, the
VAE, or the text encoder that the paper's "memory" may include.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding

from hybrid_video.diffusion import sample_chunk_fn
from hybrid_video.errors import UserError
from hybrid_video.flop_count import matmul_flops
from hybrid_video.modes.benchmark_policies import policy_model_config
from hybrid_video.nn.model import abstract_model, count_params
from hybrid_video.xla_analysis import memory_analysis_dict
from kernels.local_attention import xla as local_attention_xla

# The paper's figures (ARL2 vs Causal-Forcing's softmax, Wan2.1-1.3B, one GPU).
PAPER = {"frames_a": 921, "speedup_a": 2.26, "memory_reduction_a": 0.54,
         "frames_b": 1005, "memory_gb_b": 43.0, "softmax_memory_gb_b_min": 91.0}


def video_frames_to_chunks(frames: int, latent_per_chunk: int, time_factor: int = 4) -> int:
  """Chunks whose latents decode to at least `frames` video frames (1 + 4 (t - 1))."""
  latents = math.ceil((frames - 1) / time_factor) + 1
  return math.ceil(latents / latent_per_chunk)


class _Step:
  """The sampler step of one policy, abstract: traced or compiled per cache length."""

  def __init__(self, model_cfg, scfg, bcfg):
    self.model = abstract_model(model_cfg)
    self.graphdef, self.params = nnx.split(self.model)
    self.scfg = scfg
    self.frame_hw = tuple(int(s) for s in bcfg.frame_hw)
    self.batch = int(bcfg.batch)
    m = self.model
    self.chunk_shape = (self.batch, m.frames_per_chunk, *self.frame_hw, m.out_channels)
    tokens = int(bcfg.cond_tokens)
    self.cond = (jax.ShapeDtypeStruct((self.batch, tokens, int(model_cfg.text_dim)), jnp.float32)
                 if model_cfg.cond == "embeddings" else
                 jax.ShapeDtypeStruct((self.batch, tokens), jnp.int32)
                 if model_cfg.cond == "labels" else None)
    self.bounded = m.bounded_cache
    self.cache_limit = m.sink_chunks + m.window_chunks if m.bounded_cache else None
    self.has_cache = bool(m.softmax_layers)

  def cache_chunks(self, n: int) -> int:
    """Cache slots for chunk n (n chunks before it): exactly n for a full cache (at least 1, as
    the sampler allocates; the sampler itself grows by doubling), sink + window when bounded."""
    if not self.has_cache:
      return 1
    return self.cache_limit if self.bounded else max(1, n)

  def _args(self, capacity: int):
    one = SingleDeviceSharding(jax.devices()[0])
    place = lambda t: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), t)
    carry = jax.eval_shape(lambda: self.model.init_carry(self.batch, self.frame_hw, capacity))
    context = jax.eval_shape(lambda p, c: nnx.merge(self.graphdef, p).embed_condition(
        c, self.batch), self.params, self.cond)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=one)
    return place(self.params), place(carry), key, place(context)

  def swept_keys(self, capacity: int) -> int:
    """Cache keys the XLA cached attention scores: all of them when they fit one key block,
    else whole blocks of CACHE_KEY_BLOCK keys (kernels/local_attention/xla.py)."""
    fp, hp, wp = self.model.chunk_grid(self.frame_hw)
    keys = capacity * fp * hp * wp
    block = local_attention_xla.CACHE_KEY_BLOCK
    return keys if keys <= block else -(-keys // block) * block

  def jitted(self):
    return jax.jit(sample_chunk_fn(self.graphdef, self.scfg, self.chunk_shape),
                   donate_argnums=(1,))

  def flops(self, capacity: int) -> float:
    return matmul_flops(jax.make_jaxpr(sample_chunk_fn(self.graphdef, self.scfg,
                                                       self.chunk_shape))(*self._args(capacity)))

  def footprint(self, capacity: int) -> dict:
    compiled = self.jitted().lower(*self._args(capacity)).compile()
    return memory_analysis_dict(compiled.memory_analysis())


def policy_flops(step: _Step, num_chunks: int) -> list[float]:
  """Matmul FLOPs of chunks 0..num_chunks-1: traced at three cache lengths (affine check)."""
  caps = sorted({step.cache_chunks(n) for n in range(num_chunks)})
  keys = {c: step.swept_keys(c) for c in caps}
  distinct = sorted({keys[c]: c for c in caps}.values(), key=keys.get)
  if len(distinct) <= 3:
    table = {c: step.flops(c) for c in caps}
  else:
    a, b, c = distinct[0], distinct[1], distinct[-1]
    fa, fb, fc = step.flops(a), step.flops(b), step.flops(c)
    slope = (fb - fa) / (keys[b] - keys[a])
    predicted = fa + slope * (keys[c] - keys[a])
    if not math.isclose(predicted, fc, rel_tol=1e-9):
      raise UserError(f"the step's FLOPs are not affine in the swept keys ({predicted:.6g} "
                      f"predicted at {c} chunks, {fc:.6g} traced)")
    table = {k: fa + slope * (keys[k] - keys[a]) for k in caps}
  return [table[step.cache_chunks(n)] for n in range(num_chunks)]


def predict(config, progress: bool = True) -> dict:
  """The prediction (module doc) for config.benchmark.policies."""
  bcfg = config.benchmark
  n_chunks = int(bcfg.num_chunks)
  f = int(config.model.frames_per_chunk)
  horizons = {PAPER["frames_a"]: video_frames_to_chunks(PAPER["frames_a"], f),
              PAPER["frames_b"]: video_frames_to_chunks(PAPER["frames_b"], f)}
  if max(horizons.values()) > n_chunks:
    raise UserError(f"benchmark.num_chunks={n_chunks} is shorter than the paper's horizons "
                    f"({horizons} chunks)")
  out = {"mode": "predict", "num_chunks": n_chunks, "horizons": horizons, "paper": PAPER,
         "policies": {}}
  for name in bcfg.policies:
    t0 = time.perf_counter()
    step = _Step(policy_model_config(config.model, name, bcfg), config.sampler, bcfg)
    flops = policy_flops(step, n_chunks)
    mem = {frames: step.footprint(step.cache_chunks(chunks - 1))
           for frames, chunks in horizons.items()}
    out["policies"][name] = {
        "params": count_params(step.model), "hybrid_layers": list(step.model.hybrid_layers),
        "flops_per_chunk": flops,
        "memory": {str(k): v for k, v in mem.items()},
        "seconds": time.perf_counter() - t0}
    if progress:
      print(f"  {name}: chunk 0 {flops[0]:.4g} FLOPs, chunk {n_chunks - 1} {flops[-1]:.4g}; "
            + ", ".join(f"{k} frames {v['footprint'] / 2**30:.1f} GiB" for k, v in mem.items())
            + f" ({out['policies'][name]['seconds']:.0f} s)")
  ref, cand = bcfg.reference, bcfg.candidate
  pol = out["policies"]
  if ref in pol and cand in pol:
    cmp = {}
    for frames, chunks in horizons.items():
      r, c = pol[ref], pol[cand]
      cmp[str(frames)] = {
          "chunks": chunks,
          "speedup": float(np.sum(r["flops_per_chunk"][:chunks]) /
                           np.sum(c["flops_per_chunk"][:chunks])),
          "last_chunk_speedup": r["flops_per_chunk"][chunks - 1] /
                                c["flops_per_chunk"][chunks - 1],
          "memory_reduction": 1 - c["memory"][str(frames)]["footprint"] /
                              r["memory"][str(frames)]["footprint"],
          "reference_gib": r["memory"][str(frames)]["footprint"] / 2**30,
          "candidate_gib": c["memory"][str(frames)]["footprint"] / 2**30}
    out["comparison"] = {"reference": ref, "candidate": cand, **cmp}
  return out


def table(results: dict) -> str:
  """The predicted comparison beside the paper's figures."""
  lines = [f"predicted at the paper's shapes (nothing executed; {results['num_chunks']} chunks):",
           f"{'policy':16s}{'FLOPs chunk 0':>15s}{'FLOPs last':>13s}" +
           "".join(f"{f'GiB @{k}f':>12s}" for k in results["horizons"])]
  for name, p in results["policies"].items():
    lines.append(f"{name:16s}{p['flops_per_chunk'][0]:15.4g}{p['flops_per_chunk'][-1]:13.4g}" +
                 "".join(f"{p['memory'][str(k)]['footprint'] / 2**30:12.1f}"
                         for k in results["horizons"]))
  c = results.get("comparison")
  if c:
    a, b = str(PAPER["frames_a"]), str(PAPER["frames_b"])
    lines.append(
        f"{c['candidate']} vs {c['reference']} at {a} frames: {c[a]['speedup']:.2f}x faster "
        f"(matmul work; last chunk {c[a]['last_chunk_speedup']:.2f}x), memory "
        f"{-c[a]['memory_reduction']:+.0%} ({c[a]['candidate_gib']:.1f} vs "
        f"{c[a]['reference_gib']:.1f} GiB); paper: {PAPER['speedup_a']}x, "
        f"-{PAPER['memory_reduction_a']:.0%}")
    lines.append(
        f"at {b} frames: {c[b]['candidate_gib']:.1f} GiB vs {c[b]['reference_gib']:.1f} GiB "
        f"(paper: {PAPER['memory_gb_b']:g} GB vs > {PAPER['softmax_memory_gb_b_min']:g} GB)")
  return "\n".join(lines)
