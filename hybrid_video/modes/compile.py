"""--mode=compile: lower and compile the steps a user runs at scale for the configured mesh,
without allocating or running anything, then print per-device memory, FLOPs and a verdict
against the device memory (`compile.device_memory_gib`).

Steps (`compile.steps`):
  train           the from-scratch train step (flow matching, optimizer, EMA)
  stage1          conversion stage 1: per-layer alignment on the frozen teacher's taps
  stage2_tf       conversion stage 2 by teacher forcing: the frozen teacher's forward plus the
                  student's, LoRA and hybrid parameters trained
  stage2_rollout  conversion stage 2 on the student's own rollouts (convert.stage2.rollout)
  sample          one sampler step (every denoising pass plus the context pass) against a K/V
                  cache of sampler.cache_chunks chunks
  vae_decode      one streaming Wan-VAE decode step of compile.vae_latents latents (a later
                  chunk: the cache is full), at data.frame_size latents (configs/wan.py only)

Training steps take a global batch of train.batch_size clips of compile.clip_chunks chunks; the
stage steps use the config's `convert` section (configs/convert.py) with the model config as the
teacher (all softmax) and `convert.hybrid` as the student's hybrid layers. The frozen teacher is
an input, never differentiated, stored in `convert.teacher_dtype`.

Works with fake CPU devices (CPU XLA's buffer assignment estimates GPU/TPU memory; it is not a
measurement). On CPU every step compiles with XLA:CPU's `cse_barrier_expander` pass skipped, so
that model.remat takes effect as it does on GPU and TPU (xla_analysis.compiler_options;
without it a CPU train step kept every layer's activations):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    python main.py --mode=compile --config=configs/arl2_wan1_3b.py --workdir=/tmp/aot
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from hybrid_video import sharding as sharding_lib
from hybrid_video.conversion.losses import (make_alignment_loss, make_distill_loss,
                                            make_rollout_loss, rollout_model_config)
from hybrid_video.conversion.stages import make_stage_step, rollout_teacher_config, stored_teacher
from hybrid_video.conversion.surgery import copy_config, student_model_config, trainable_filter
from hybrid_video.diffusion import sample_chunk_fn
from hybrid_video.errors import UserError
from hybrid_video.flop_count import matmul_flops
from hybrid_video.inputs import frame_hw as video_frame_hw
from hybrid_video.nn.model import CausalDiT, abstract_model, count_params
from hybrid_video.nn.vae import VAE, VAEConfig
from hybrid_video.optim import make_optimizer
from hybrid_video.train import make_train_step
from hybrid_video.train_state import abstract_train_state, init_train_state, train_state_specs
from hybrid_video.xla_analysis import analyse, compiler_options

STEPS = ("train", "stage1", "stage2_tf", "stage2_rollout", "sample", "vae_decode")
_MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                  "alias_size_in_bytes", "generated_code_size_in_bytes")


def _gib(n) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:9.2f} {unit}"
  return f"{n:9d} B"


def verdict(total_bytes: int, device_gib: float) -> str:
  """One line: does a step's per-device total fit the device memory?"""
  frac = total_bytes / (device_gib * 2**30)
  word = "fits" if frac <= 1 else "DOES NOT FIT"
  return f"{word}: {total_bytes / 2**30:.2f} GiB of {device_gib:g} GiB per device ({frac:.0%})"


def _print(name: str, stats: dict):
  print(f"{name}  (compiled in {stats['compile_seconds']:.1f} s; per device)")
  for f in _MEMORY_FIELDS + ("total_per_device_bytes",):
    if f in stats:
      print(f"  {f:32s}{_gib(stats[f])}")
  if "flops" in stats:
    print(f"  {'flops (XLA, loop bodies once)':32s}{stats['flops']:.4g}")
  print(f"  {'matmul flops (every loop trip)':32s}{stats['matmul_flops']:.4g}  (global)")
  print(f"  {stats['verdict']}")


class _Planner:
  """Abstract inputs and shardings of every step, built from one config and mesh."""

  def __init__(self, config, mesh, rules):
    self.config, self.mesh, self.rules = config, mesh, rules
    self.replicated = NamedSharding(mesh, P())
    self.key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=self.replicated)

  def shard(self, tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                        shardings)

  def params(self, tree):
    """(abstract tree placed with its parameter shardings, the shardings)."""
    sh = sharding_lib.named(self.mesh, sharding_lib.param_specs(tree, self.rules, self.mesh))
    return self.shard(tree, sh), sh

  def batch(self, model: CausalDiT) -> dict:
    config = self.config
    tcfg, ccfg = config.train, config.compile
    h, w = video_frame_hw(config)
    frames = ccfg.clip_chunks * model.frames_per_chunk
    shape = (tcfg.batch_size, frames, h, w, model.in_channels)
    sharded = lambda s, dtype: jax.ShapeDtypeStruct(
        s, dtype, sharding=NamedSharding(self.mesh,
                                         sharding_lib.batch_spec(self.rules, self.mesh, s)))
    batch = {"video": sharded(shape, jnp.float32)}
    if config.model.cond == "labels":
      batch["labels"] = sharded((tcfg.batch_size, 1), jnp.int32)
    elif config.model.cond == "embeddings":
      batch["cond"] = sharded((tcfg.batch_size, ccfg.cond_tokens, config.model.text_dim),
                              jnp.float32)
    return batch


def _train(p: _Planner):
  config = p.config
  tx = make_optimizer(config.train)
  model, state = abstract_train_state(config.model, tx)
  graphdef, _ = nnx.split(model)
  state_sh = sharding_lib.named(p.mesh, train_state_specs(state, tx, p.rules, p.mesh))
  batch = p.batch(model)
  step = jax.jit(make_train_step(graphdef, tx, config.train),
                 in_shardings=(state_sh, None, p.replicated),
                 out_shardings=(state_sh, p.replicated), donate_argnums=(0,))
  return step, (p.shard(state, state_sh), batch, p.key), {"batch_shape": list(batch["video"].shape)}


def _teacher_and_student(p: _Planner, stage: int):
  ccfg = p.config.get("convert")
  if not ccfg:
    raise UserError("--config.compile.steps with stage1/stage2_* needs a config with a `convert` "
                    "section (configs/convert.py, configs/arl2_wan1_3b.py)")
  teacher_cfg = copy_config(p.config.model)
  teacher_cfg.hybrid.ratio, teacher_cfg.hybrid.layers = 0.0, None
  teacher_cfg.lora = None
  student_cfg = student_model_config(teacher_cfg, ccfg, lora=stage == 2)
  return teacher_cfg, student_cfg


def _stage(p: _Planner, stage: int, mode: str):
  teacher_cfg, student_cfg = _teacher_and_student(p, stage)
  ccfg = p.config.convert
  scfg = ccfg.stage1 if stage == 1 else ccfg.stage2
  student = abstract_model(student_cfg)
  graphdef, trainable, frozen = nnx.split(student, trainable_filter(stage), ...)
  teacher_graphdef, teacher_params = nnx.split(abstract_model(teacher_cfg))
  teacher_params = stored_teacher(teacher_params, ccfg.get("teacher_dtype", "float32"))
  tx = make_optimizer(scfg)
  state = jax.eval_shape(lambda t: init_train_state(t, tx), trainable)
  state_sh = sharding_lib.named(p.mesh, train_state_specs(state, tx, p.rules, p.mesh))
  frozen, frozen_sh = p.params(frozen)
  teacher_params, teacher_sh = p.params(teacher_params)
  batch = p.batch(student)
  f = student.frames_per_chunk
  if stage == 1:
    loss = make_alignment_loss(graphdef, teacher_graphdef, student.hybrid_layers, scfg, f)
  elif mode == "teacher_forcing":
    loss = make_distill_loss(graphdef, teacher_graphdef, scfg, f)
  else:
    rcfg = scfg.rollout
    loss_graphdef = nnx.split(abstract_model(rollout_model_config(student_cfg, rcfg)),
                              trainable_filter(stage), ...)[0]
    bounded = rollout_teacher_config(teacher_cfg, rcfg)
    if bounded is not None:
      teacher_graphdef = nnx.split(abstract_model(bounded))[0]
    b = int(p.config.train.batch_size)
    chunk_shape = (b, f, *video_frame_hw(p.config), student.out_channels)
    loss = make_rollout_loss(loss_graphdef, teacher_graphdef, p.config.sampler, scfg, chunk_shape)
  step = jax.jit(make_stage_step(loss, tx, scfg),
                 in_shardings=(state_sh, None, p.replicated, frozen_sh, teacher_sh),
                 out_shardings=(state_sh, p.replicated), donate_argnums=(0,))
  extra = {"batch_shape": list(batch["video"].shape), "hybrid_layers": list(student.hybrid_layers),
           "trainable_params": sum(math.prod(x.shape) for x in jax.tree.leaves(trainable)),
           "teacher_dtype": str(ccfg.get("teacher_dtype", "float32"))}
  if mode == "rollout":
    extra["rollout_chunks"] = int(scfg.rollout.num_chunks)
    extra["rollout_grad_chunks"] = int(scfg.rollout.grad_chunks)
  return step, (p.shard(state, state_sh), batch, p.key, frozen, teacher_params), extra


def _sample(p: _Planner):
  config = p.config
  model = abstract_model(config.model)
  graphdef, params = nnx.split(model)
  params, params_sh = p.params(params)
  b = int(config.compile.sample_batch)
  frame_hw = video_frame_hw(config)
  chunk_shape = (b, model.frames_per_chunk, *frame_hw, model.out_channels)
  carry = jax.eval_shape(lambda: model.init_carry(b, frame_hw, int(config.sampler.cache_chunks)))
  carry_sh = sharding_lib.named(p.mesh, sharding_lib.carry_specs(carry, p.rules, p.mesh))
  context = jax.eval_shape(lambda q, c: nnx.merge(graphdef, q).embed_condition(c, b), params,
                           _cond_struct(config, b))
  context = jax.ShapeDtypeStruct(context.shape, context.dtype, sharding=p.replicated)
  frames_sh = NamedSharding(p.mesh, sharding_lib.batch_spec(p.rules, p.mesh, chunk_shape))
  step = jax.jit(sample_chunk_fn(graphdef, config.sampler, chunk_shape),
                 in_shardings=(params_sh, carry_sh, p.replicated, p.replicated),
                 out_shardings=(carry_sh, frames_sh), donate_argnums=(1,))
  history = int(config.sampler.cache_chunks) * model.frames_per_chunk
  return step, (params, p.shard(carry, carry_sh), p.key, context), {
      "chunk_shape": list(chunk_shape), "cache_chunks": int(config.sampler.cache_chunks),
      "history_latent_frames": history}


def _vae_decode(p: _Planner):
  config = p.config
  if "t2v" not in config:
    raise UserError("compile step vae_decode needs a Wan config (configs/wan.py: the VAE "
                    "decodes the DiT's latents)")
  dtype = jnp.dtype(config.t2v.vae_dtype)
  vae = nnx.eval_shape(lambda: VAE(VAEConfig(), rngs=nnx.Rngs(0), dtype=dtype))
  graphdef, state = nnx.split(vae)
  state = p.shard(state, jax.tree.map(lambda _: p.replicated, state))
  b = int(config.compile.sample_batch)
  h, w = video_frame_hw(config)
  n = int(config.compile.vae_latents)
  cache = vae.decode_cache_spec(b, h, w, first=False)
  cache_sh = jax.tree.map(lambda x: NamedSharding(
      p.mesh, sharding_lib.batch_spec(p.rules, p.mesh, x.shape) if x.ndim else P()), cache)
  lat_shape = (b, n, h, w, vae.config.z_dim)
  latents = jax.ShapeDtypeStruct(lat_shape, jnp.float32, sharding=NamedSharding(
      p.mesh, sharding_lib.batch_spec(p.rules, p.mesh, lat_shape)))

  def decode(state, cache, latents):
    return nnx.merge(graphdef, state).decode_chunk(cache, latents)

  step = jax.jit(decode, donate_argnums=(1,))
  return step, (state, p.shard(cache, cache_sh), latents), {
      "latents_shape": list(lat_shape), "dtype": str(dtype)}


BUILDERS: dict[str, Callable[[_Planner], tuple[Any, tuple, dict]]] = {
    "train": _train,
    "stage1": lambda p: _stage(p, 1, "teacher_forcing"),
    "stage2_tf": lambda p: _stage(p, 2, "teacher_forcing"),
    "stage2_rollout": lambda p: _stage(p, 2, "rollout"),
    "sample": _sample,
    "vae_decode": _vae_decode,
}


def measure(step, args, mesh, rules) -> dict:
  """Trace, lower and compile `step(*args)` on abstract arguments: XLA's per-device memory and
  FLOPs, plus the matmul FLOPs of the traced step with every loop trip."""
  t0 = time.perf_counter()
  with sharding_lib.activation_sharding(mesh, rules):
    traced = step.trace(*args)
    compiled = traced.lower().compile(compiler_options=compiler_options(
        mesh.devices.flat[0].platform))
  stats = analyse(compiled)
  stats["matmul_flops"] = matmul_flops(traced.jaxpr)
  stats["compile_seconds"] = time.perf_counter() - t0
  return stats


def compile_steps(config, mesh, rules, steps, *, echo: bool = True) -> dict:
  """{step name: per-device figures} of `steps` compiled for `mesh` (see the module doc)."""
  unknown = [s for s in steps if s not in STEPS]
  if unknown or not steps:
    raise UserError(f"compile.steps={tuple(steps)}: choose from {', '.join(STEPS)}")
  device_gib = float(config.compile.device_memory_gib)
  planner = _Planner(config, mesh, rules)
  results = {}
  for name in steps:
    step, args, extra = BUILDERS[name](planner)
    stats = {**measure(step, args, mesh, rules), **extra}
    stats["verdict"] = verdict(stats.get("total_per_device_bytes", 0), device_gib)
    results[name] = stats
    if echo:
      _print(f"{name}  {json.dumps(extra)}", stats)
  return results


def compile_main(config, workdir: str | None = None, *, overrides=None) -> dict:
  del overrides
  steps = tuple(config.compile.steps)
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.rules_from_config(config.mesh)
  print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices")
  model = abstract_model(config.model)
  print(f"parameters: {count_params(model):,}  hybrid layers: {list(model.hybrid_layers)}")
  results = {"mesh": dict(mesh.shape), "devices": jax.device_count(),
             "params": count_params(model),
             "device_memory_gib": float(config.compile.device_memory_gib)}
  results.update(compile_steps(config, mesh, rules, steps))
  if workdir and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "compile_analysis.json")
    with open(path, "w") as f:
      json.dump(results, f, indent=1)
    print(f"wrote {path}")
  return results


def _cond_struct(config, batch: int):
  if config.model.cond == "labels":
    return jax.ShapeDtypeStruct((batch, 1), jnp.int32)
  if config.model.cond == "embeddings":
    return jax.ShapeDtypeStruct((batch, config.compile.cond_tokens, config.model.text_dim),
                                jnp.float32)
  return None
