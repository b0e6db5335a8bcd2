"""--mode=compile: lower and compile the train step and the sampler step for the configured
mesh without allocating or running anything, then print memory and FLOP estimates.

Works with fake CPU devices:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    python main.py --mode=compile --config=configs/arl2_wan1_3b.py --workdir=/tmp/aot
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from hybrid_video import sharding as sharding_lib
from hybrid_video.diffusion import sample_chunk_fn
from hybrid_video.inputs import frame_hw as video_frame_hw
from hybrid_video.nn.model import CausalDiT, count_params
from hybrid_video.optim import make_optimizer
from hybrid_video.train import make_train_step
from hybrid_video.train_state import abstract_train_state, train_state_specs
from hybrid_video.xla_analysis import analyse

_MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                  "alias_size_in_bytes", "generated_code_size_in_bytes")


def _gib(n) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:9.2f} {unit}"
  return f"{n:9d} B"


def _print(name: str, stats: dict, seconds: float):
  print(f"{name}  (compiled in {seconds:.1f} s; per device)")
  for f in _MEMORY_FIELDS + ("total_per_device_bytes",):
    if f in stats:
      print(f"  {f:32s}{_gib(stats[f])}")
  if "flops" in stats:
    print(f"  {'flops (XLA estimate)':32s}{stats['flops']:.4g}")


def _abstract_batch(config, model: CausalDiT, mesh, rules):
  tcfg, ccfg = config.train, config.compile
  h, w = video_frame_hw(config)
  frames = ccfg.clip_chunks * model.frames_per_chunk
  shape = (tcfg.batch_size, frames, h, w, model.in_channels)
  sharded = lambda s, dtype: jax.ShapeDtypeStruct(
      s, dtype, sharding=NamedSharding(mesh, sharding_lib.batch_spec(rules, mesh, s)))
  batch = {"video": sharded(shape, jnp.float32)}
  if config.model.cond == "labels":
    batch["labels"] = sharded((tcfg.batch_size, 1), jnp.int32)
  elif config.model.cond == "embeddings":
    batch["cond"] = sharded((tcfg.batch_size, ccfg.cond_tokens, config.model.text_dim),
                            jnp.float32)
  return batch


def compile_main(config, workdir: str | None = None, *, overrides=None) -> dict:
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.rules_from_config(config.mesh)
  print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices")
  tx = make_optimizer(config.train)
  abstract_model, abstract_state = abstract_train_state(config.model, tx)
  graphdef, _ = nnx.split(abstract_model)
  print(f"parameters: {count_params(abstract_model):,}  hybrid layers: "
        f"{list(abstract_model.hybrid_layers)}")
  replicated = NamedSharding(mesh, P())
  results = {"mesh": dict(mesh.shape), "params": count_params(abstract_model)}

  # Train step.
  state_sh = sharding_lib.named(mesh, train_state_specs(abstract_state, tx, rules,
                                                                     mesh))
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                abstract_state, state_sh)
  batch = _abstract_batch(config, abstract_model, mesh, rules)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
  step = jax.jit(make_train_step(graphdef, tx, config.train),
                 in_shardings=(state_sh, None, replicated),
                 out_shardings=(state_sh, replicated), donate_argnums=(0,))
  t0 = time.perf_counter()
  with sharding_lib.activation_sharding(mesh, rules):
    compiled = step.lower(abstract_state, batch, key).compile()
  results["train_step"] = analyse(compiled)
  results["train_step"]["batch_shape"] = list(batch["video"].shape)
  _print(f"train_step  batch {tuple(batch['video'].shape)}", results["train_step"],
         time.perf_counter() - t0)

  # Sampler step (one chunk: every denoising pass plus the context pass).
  b = config.compile.sample_batch
  frame_hw = video_frame_hw(config)
  chunk_shape = (b, abstract_model.frames_per_chunk, *frame_hw, abstract_model.out_channels)
  carry = jax.eval_shape(lambda: abstract_model.init_carry(
      b, frame_hw, int(config.sampler.cache_chunks)))
  carry_sh = sharding_lib.named(mesh, sharding_lib.carry_specs(carry, rules, mesh))
  carry = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       carry, carry_sh)
  params_sh = state_sh["ema"]
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_state["ema"], params_sh)
  context = jax.eval_shape(lambda p, c: nnx.merge(graphdef, p).embed_condition(c, b), params,
                           _cond_struct(config, b))
  context = jax.ShapeDtypeStruct(context.shape, context.dtype, sharding=replicated)
  frames_sh = NamedSharding(mesh, sharding_lib.batch_spec(rules, mesh, chunk_shape))
  sample_step = jax.jit(sample_chunk_fn(graphdef, config.sampler, chunk_shape),
                        in_shardings=(params_sh, carry_sh, replicated, replicated),
                        out_shardings=(carry_sh, frames_sh), donate_argnums=(1,))
  t0 = time.perf_counter()
  with sharding_lib.activation_sharding(mesh, rules):
    compiled = sample_step.lower(params, carry, key, context).compile()
  results["sample_step"] = analyse(compiled)
  results["sample_step"]["chunk_shape"] = list(chunk_shape)
  results["sample_step"]["cache_chunks"] = int(config.sampler.cache_chunks)
  _print(f"sample_step chunk {chunk_shape}, K/V cache {config.sampler.cache_chunks} chunks",
         results["sample_step"], time.perf_counter() - t0)
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
