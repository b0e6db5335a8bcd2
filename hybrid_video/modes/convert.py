"""Converting a softmax AR teacher into an ARL2 hybrid: the two-stage recipe (method doc §3, §6).

  teacher checkpoint (all softmax, --mode=train; its EMA parameters)
    -> convert   copy W_q, W_k, W_v, W_o, the q/k norms and every other weight; phi = I, GDN
                 gate init (HybridAttention's own initialisation)
    -> stage 1   per-layer alignment: every hybrid layer gets the teacher's own input to that
                 layer and matches the teacher's softmax output before W_o (MSE, summed over
                 layers); only W_a, W_b, W_gate, A_log, dt_bias and phi train
    -> stage 2   end-to-end distillation against the frozen teacher, plus LoRA on the memory
                 branch's q, k, v and the hybrid layers' MLPs (`hybrid_video/lora.py`); either
                 teacher forcing on dataset clips or student rollouts through the streaming path
    -> export    MLP LoRA merged into W; memory-branch LoRA kept as a low-rank memory-only
                 projection delta (it cannot merge into the shared W_q, see lora.py); written as
                 a plain --mode=train checkpoint to <workdir>/checkpoints
    -> eval      PSNR on the test split, teacher vs student with the same noise; sample videos

Workdir: stage1/ and stage2/ (checkpoints of the trainable parameters, metrics), checkpoints/
(the export: `--mode=sample --workdir=<workdir>` loads it), samples/, eval.json, params.txt.

Frozen parameters never enter the gradient or the optimizer: the student is split into a
trainable and a frozen partition and only the first is updated. So frozen weights stay
bit-identical by construction (masked zero updates would turn -0.0 into +0.0) and cost no
optimizer memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx, traverse_util
from tqdm.auto import tqdm

from hybrid_video import checkpoint as ckpt_lib
from hybrid_video import inputs as inputs_lib
from hybrid_video import restore as restore_lib
from hybrid_video import train as train_lib
from hybrid_video.chunk_runner import ChunkRunner
from hybrid_video.diffusion import add_noise, sample_chunk_fn
from hybrid_video.errors import CheckpointError, NonFiniteLossError, UserError
from hybrid_video.lora import LoRAParam, lora_settings, merge_into
from hybrid_video.metrics import MetricWriter, read_jsonl
from hybrid_video.model import CausalDiT, abstract_model, resolve_hybrid_layers

# The parameters a hybrid layer adds to the softmax layer it replaces (method doc §3).
NEW_PARAMS = ("phi_q", "phi_k", "phi_v", "w_a", "w_b", "w_gate", "a_log", "dt_bias")
BACKEND_FIELDS = ("attention_impl", "memory_impl", "kernel_interpret", "gdn_chunk_size")
STAGE2_MODES = ("teacher_forcing", "rollout")


# -- configs and parameter partitions --------------------------------------------------------------


def copy_config(cfg) -> ml_collections.ConfigDict:
  """An unlocked deep copy with placeholders resolved (a saved JSON config has the same form)."""
  return ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))


def student_model_config(teacher_cfg, ccfg, *, lora: bool) -> ml_collections.ConfigDict:
  """The student's `model` config: the teacher's, with `convert.hybrid` layers made hybrid and,
  for stage 2, the `convert.lora` section (`model.lora`, read by blocks.py)."""
  m = copy_config(teacher_cfg)
  if resolve_hybrid_layers(m.num_layers, m.hybrid.layers, m.hybrid.ratio):
    raise UserError("the teacher already has hybrid layers; conversion starts from an all-softmax "
                    "model (train it with --config=configs/default.py:softmax)")
  layers = resolve_hybrid_layers(m.num_layers, ccfg.hybrid.layers, ccfg.hybrid.ratio)
  if not layers:
    raise UserError(f"convert.hybrid selects no layer (ratio={ccfg.hybrid.ratio}, "
                    f"layers={ccfg.hybrid.layers}); nothing to convert")
  m.hybrid.layers = tuple(layers)
  lc = ccfg.lora
  m.lora = ml_collections.ConfigDict({
      "rank": int(lc.rank) if lora else 0, "alpha": float(lc.alpha),
      "mlp": bool(lc.mlp), "memory": bool(lc.memory)})
  return m


def trainable_filter(stage: int):
  """nnx filter of the parameters that train in `stage` (1: the new hybrid ones; 2: + LoRA)."""
  new = nnx.Any(*(nnx.PathContains(name) for name in NEW_PARAMS))
  return new if stage == 1 else nnx.Any(new, LoRAParam)


def _is_new(path) -> bool:
  return any(k in NEW_PARAMS or (isinstance(k, str) and k.endswith("_lora")) for k in path)


def flatten_state(state) -> dict:
  """{path tuple: array} of an nnx.State, e.g. ("blocks", 0, "self_attn", "q", "kernel")."""
  return traverse_util.flatten_dict(state.to_pure_dict())


def path_name(path) -> str:
  return "/".join(str(k) for k in path)


def _set_flat(model, state, flat: dict) -> None:
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
  nnx.update(model, state)


@dataclasses.dataclass(frozen=True)
class ParamCount:
  total: int
  trainable: int

  @property
  def frozen(self) -> int:
    return self.total - self.trainable

  @property
  def trainable_percent(self) -> float:
    return 100.0 * self.trainable / max(self.total, 1)


def parameter_table(teacher_cfg, ccfg) -> list[tuple[str, ParamCount]]:
  """Counts per stage, from one abstract stage-2 student (nothing is allocated: fine at Wan
  scale). Its parameters are the teacher's, the new hybrid ones, and the LoRA factors."""
  s2 = student_model_config(teacher_cfg, ccfg, lora=True)
  model = abstract_model(s2)
  sizes = {"base": 0, "new": 0, "mlp_lora": 0, "memory_lora": 0}
  for path, x in flatten_state(nnx.state(model, nnx.Param)).items():
    if any(k in ("fc1_lora", "fc2_lora") for k in path):
      kind = "mlp_lora"
    elif any(isinstance(k, str) and k.endswith("_lora") for k in path):
      kind = "memory_lora"
    else:
      kind = "new" if _is_new(path) else "base"
    sizes[kind] += math.prod(x.shape)
  base, new, lora = sizes["base"], sizes["new"], sizes["mlp_lora"] + sizes["memory_lora"]
  return [("teacher", ParamCount(base, 0)),
          ("stage 1 (align)", ParamCount(base + new, new)),
          ("stage 2 (distill)", ParamCount(base + new + lora, new + lora)),
          ("export (merged)", ParamCount(base + new + sizes["memory_lora"], 0))]


def format_table(rows: list[tuple[str, ParamCount]]) -> str:
  lines = [f"{'stage':<20}{'total':>15}{'frozen':>15}{'trainable':>13}{'trainable %':>13}"]
  for name, c in rows:
    lines.append(f"{name:<20}{c.total:>15,}{c.frozen:>15,}{c.trainable:>13,}"
                 f"{c.trainable_percent:>12.3f}%")
  return "\n".join(lines)


# -- teacher loading and conversion ----------------------------------------------------------------


def load_teacher(config) -> tuple[CausalDiT, ml_collections.ConfigDict, int]:
  """(teacher with its EMA parameters, its model config, step) from convert.teacher_workdir.

  The checkpoint's config defines the teacher; the back-end fields come from this config."""
  ccfg = config.convert
  workdir = ccfg.teacher_workdir
  hint = ("train one with --mode=train --config=configs/default.py:softmax "
          f"--workdir={workdir or 'DIR'}")
  if not workdir:
    raise UserError("set --config.convert.teacher_workdir=DIR: the --workdir of an all-softmax "
                    "model trained with --mode=train --config=configs/default.py:softmax")
  checkpoints = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(checkpoints) or not any(d.isdigit() for d in os.listdir(checkpoints)):
    raise CheckpointError(f"no teacher checkpoint in {os.path.abspath(checkpoints)}; {hint}")
  backends = {f: config.model[f] for f in BACKEND_FIELDS}
  teacher, cfg, step = restore_lib.load_model(config, workdir, ccfg.teacher_step,
                                              model_overrides=backends)
  return teacher, copy_config(cfg.model), step


def convert(teacher: CausalDiT, student_cfg, seed: int = 0) -> CausalDiT:
  """The student: every teacher parameter copied to the same path (a hybrid layer keeps the
  softmax layer's q, k, v, o and norms); the new parameters keep their initialisation
  (phi = I, the Gated-DeltaNet gate init, LoRA with B = 0)."""
  student = CausalDiT(student_cfg, rngs=nnx.Rngs(seed))
  state = nnx.state(student, nnx.Param)
  s_flat, t_flat = flatten_state(state), flatten_state(nnx.state(teacher, nnx.Param))
  for path, value in t_flat.items():
    if path not in s_flat:
      raise UserError(f"teacher parameter {path_name(path)} has no counterpart in the student")
    if s_flat[path].shape != value.shape:
      raise UserError(f"teacher parameter {path_name(path)} has shape {value.shape}, the "
                      f"student expects {s_flat[path].shape}")
    s_flat[path] = value
  extra = [path_name(p) for p in s_flat if p not in t_flat and not _is_new(p)]
  if extra:
    raise UserError(f"student parameters {extra} are neither the teacher's nor new ones")
  _set_flat(student, state, s_flat)
  return student


# -- teacher-forcing taps --------------------------------------------------------------------------


class _Tap:
  """Stands in for a block's self-attention during one teacher_forcing call."""

  def __init__(self, attn, fn: Callable):
    self.attn, self.fn = attn, fn

  def teacher_forcing(self, x_clean, x_noisy, angles, num_chunks):
    return self.fn(self.attn, x_clean, x_noisy, angles, num_chunks)


def tapped_teacher_forcing(model: CausalDiT, taps: dict[int, Callable], clean, noisy, t, cond):
  """model.teacher_forcing with block i's self-attention call replaced by taps[i](attn, ...).

  Runs the model's own forward, so the captured inputs are exactly what each layer sees.
  """
  saved = {i: model.blocks[i].self_attn for i in taps}
  remat = getattr(model, "remat", None)
  try:
    if remat:
      model.remat = False  # the taps record Python values: no nested transform around blocks
    for i, fn in taps.items():
      model.blocks[i].self_attn = _Tap(saved[i], fn)
    return model.teacher_forcing(clean, noisy, t, cond)
  finally:
    for i, attn in saved.items():
      model.blocks[i].self_attn = attn
    if remat:
      model.remat = remat


def teacher_attention_io(teacher: CausalDiT, layers, clean, noisy, t, cond) -> dict:
  """Per layer i: the teacher's modulated self-attention inputs (x_clean, x_noisy) and its
  softmax output before W_o (y_clean, y_noisy), plus angles and num_chunks."""
  record = {}

  def tap(i):
    def fn(attn, xc, xn, angles, num_chunks):
      yc, yn = attn.teacher_forcing_heads(xc, xn, angles, num_chunks)
      record[i] = {"x_clean": xc, "x_noisy": xn, "y_clean": yc, "y_noisy": yn,
                   "angles": angles, "num_chunks": num_chunks}
      return attn.out(yc), attn.out(yn)
    return fn

  tapped_teacher_forcing(teacher, {i: tap(i) for i in layers}, clean, noisy, t, cond)
  return record


def attention_inputs(model: CausalDiT, layers, clean, noisy, t, cond) -> dict:
  """Per layer i: the modulated self-attention inputs of `model`'s own forward."""
  record = {}

  def tap(i):
    def fn(attn, xc, xn, angles, num_chunks):
      record[i] = {"x_clean": xc, "x_noisy": xn, "angles": angles, "num_chunks": num_chunks}
      return attn.teacher_forcing(xc, xn, angles, num_chunks)
    return fn

  tapped_teacher_forcing(model, {i: tap(i) for i in layers}, clean, noisy, t, cond)
  return record


# -- diagnostics -----------------------------------------------------------------------------------


def _rms(a):
  return jnp.sqrt(jnp.mean(jnp.square(a.astype(jnp.float32))))


def layer_diagnostics(attn, x_clean, x_noisy, angles, num_chunks: int) -> dict[str, jax.Array]:
  """Branch magnitudes and gates of one hybrid layer in the teacher-forcing forward.

  RMS of the intra output, the raw and the gated inter output and their ratio (chunks >= 1:
  chunk 0 reads an empty state), the output gate's mean and saturated fraction (< 0.05 or
  > 0.95), and per head the retention over one chunk, exp(sum of g over its L tokens).
  """
  p = attn.teacher_forcing_parts(x_clean, x_noisy, angles, num_chunks)
  b, t = x_clean.shape[:2]
  l = t // num_chunks
  first = 1 if num_chunks > 1 else 0
  later = lambda a: a.reshape(b, num_chunks, l, *a.shape[2:])[:, first:]
  gammas = (attn.output_gate(x_clean), attn.output_gate(x_noisy))  # [B, T, H]
  intra = jnp.stack([later(p["intra_clean"]), later(p["intra_noisy"])])
  inter = jnp.stack([later(p["inter_clean"]), later(p["inter_noisy"])])
  gated = jnp.stack([later(g)[..., None] for g in gammas]) * inter
  gamma = jnp.stack(gammas)
  rms_intra, rms_gated = _rms(intra), _rms(gated)
  out = {
      "rms_intra": rms_intra,
      "rms_inter": _rms(inter),
      "rms_inter_gated": rms_gated,
      "inter_intra_ratio": rms_gated / jnp.maximum(rms_intra, 1e-12),
      "gate_mean": jnp.mean(gamma),
      "gate_saturated": jnp.mean(((gamma < 0.05) | (gamma > 0.95)).astype(jnp.float32)),
  }
  g = p["g"].reshape(b, num_chunks, l, -1)
  retention = jnp.mean(jnp.exp(jnp.sum(g, axis=2)), axis=(0, 1))  # [H]
  out["retention_mean"] = jnp.mean(retention)
  for h in range(retention.shape[0]):
    out[f"retention_h{h}"] = retention[h]
  return out


def diagnostics(student: CausalDiT, record: dict) -> dict[str, jax.Array]:
  """layer_diagnostics of every hybrid layer on recorded inputs, as 'layer{i}/name' scalars."""
  out = {}
  for i, r in record.items():
    d = layer_diagnostics(student.blocks[i].self_attn, r["x_clean"], r["x_noisy"], r["angles"],
                          r["num_chunks"])
    out.update({f"layer{i}/{k}": v for k, v in d.items()})
  return out


# -- losses ----------------------------------------------------------------------------------------


def _mse(a, b):
  return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))


def alignment_loss(student: CausalDiT, record: dict):
  """Stage 1: sum over hybrid layers of the MSE between the layer's pre-W_o output and the
  teacher's, on the teacher's inputs (clean and noisy copies weigh equally)."""
  per_layer = {}
  for i, r in record.items():
    yc, yn = student.blocks[i].self_attn.teacher_forcing_heads(
        r["x_clean"], r["x_noisy"], r["angles"], r["num_chunks"])
    per_layer[f"layer{i}/align_loss"] = 0.5 * (_mse(yc, r["y_clean"]) + _mse(yn, r["y_noisy"]))
  return sum(per_layer.values()), per_layer


def make_alignment_loss(graphdef, teacher_graphdef, layers, scfg, frames_per_chunk):
  def loss_fn(trainable, frozen, teacher_params, batch, rng):
    student = nnx.merge(graphdef, trainable, frozen)
    teacher = nnx.merge(teacher_graphdef, teacher_params)
    x0 = batch["video"]
    x_t, t, _ = train_lib.noisy_inputs(x0, rng, frames_per_chunk, scfg)
    record = teacher_attention_io(teacher, layers, x0, x_t, t, batch.get("labels"))
    record = {i: {k: v if k == "num_chunks" else jax.lax.stop_gradient(v) for k, v in r.items()}
              for i, r in record.items()}
    return alignment_loss(student, record)
  return loss_fn


def make_distill_loss(graphdef, teacher_graphdef, scfg, frames_per_chunk):
  """Stage 2, teacher forcing: MSE between student and teacher predictions on dataset clips."""
  def loss_fn(trainable, frozen, teacher_params, batch, rng):
    student = nnx.merge(graphdef, trainable, frozen)
    teacher = nnx.merge(teacher_graphdef, teacher_params)
    x0, cond = batch["video"], batch.get("labels")
    x_t, t, eps = train_lib.noisy_inputs(x0, rng, frames_per_chunk, scfg)
    target = jax.lax.stop_gradient(teacher.teacher_forcing(x0, x_t, t, cond))
    pred = student.teacher_forcing(x0, x_t, t, cond)
    return _mse(pred, target), {"student_flow_loss": _mse(pred, eps - x0),
                                "teacher_flow_loss": _mse(target, eps - x0)}
  return loss_fn


def rollout_model_config(model_cfg, rcfg) -> ml_collections.ConfigDict:
  """Rollouts bound the softmax layers' K/V caches (teacher and student alike) when
  rollout.window_chunks > 0, so memory does not grow with the rollout length."""
  m = copy_config(model_cfg)
  m.kv_cache.sink_chunks = int(rcfg.sink_chunks)
  m.kv_cache.window_chunks = int(rcfg.window_chunks)
  return m


def make_rollout_loss(graphdef, teacher_graphdef, sampler_cfg, scfg, chunk_shape):
  """Stage 2, student rollouts.

  The student generates its own history chunk by chunk with its streaming sampler
  (`sample_chunk_fn`, no gradient through generation); after each chunk both the student and
  the teacher run the context pass on the generated chunk, so the teacher's K/V cache holds the
  same history as the student's memory. For the last `grad_chunks` chunks, a noised copy of the
  generated chunk is denoised by both against their carries and the student's prediction is
  matched to the teacher's. Two lax.scans over chunks: the burn-in has no gradient at all and
  its carry is stop-gradiented, so peak memory depends on grad_chunks, not on num_chunks.
  """
  rcfg = scfg.rollout
  num_chunks, grad_chunks = int(rcfg.num_chunks), int(rcfg.grad_chunks)
  if not 1 <= grad_chunks <= num_chunks:
    raise UserError(f"convert.stage2.rollout: need 1 <= {grad_chunks=} <= {num_chunks=}")
  b, f = chunk_shape[0], chunk_shape[1]
  frame_hw = tuple(chunk_shape[2:4])

  def loss_fn(trainable, frozen, teacher_params, batch, rng):
    student = nnx.merge(graphdef, trainable, frozen)
    teacher = nnx.merge(teacher_graphdef, teacher_params)
    fixed = nnx.merge(graphdef, jax.lax.stop_gradient(trainable), frozen)
    gen_graphdef, gen_state = nnx.split(fixed)
    sample_chunk = sample_chunk_fn(gen_graphdef, sampler_cfg, chunk_shape)
    cond = batch.get("labels")
    ctx_s, ctx_t = student.embed_condition(cond, b), teacher.embed_condition(cond, b)
    capacity = num_chunks
    carry = (student.init_carry(b, frame_hw, capacity), teacher.init_carry(b, frame_hw, capacity))
    zeros = jnp.zeros((b,), jnp.float32)

    def advance(model, carry, with_loss):
      cs, ct = carry
      key = jax.random.fold_in(rng, cs["chunk"])
      k_gen, k_t, k_eps = jax.random.split(key, 3)
      _, x0 = sample_chunk(gen_state, jax.lax.stop_gradient(cs), k_gen,
                           jax.lax.stop_gradient(ctx_s))
      x0 = jax.lax.stop_gradient(x0)
      loss = jnp.zeros((), jnp.float32)
      if with_loss:
        t = train_lib.sample_chunk_times(k_t, b, 1, scfg)[:, 0]
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        x_t = add_noise(x0, eps, jnp.repeat(t[:, None], f, axis=1))
        v_s, _ = model.step(x_t, t, ctx_s, cs, write=False)
        v_t, _ = teacher.step(x_t, t, ctx_t, ct, write=False)
        loss = _mse(v_s, jax.lax.stop_gradient(v_t))
      _, cs = model.step(x0, zeros, ctx_s, cs, write=True)
      _, ct = teacher.step(x0, zeros, ctx_t, ct, write=True)
      return (cs, ct), loss

    burn_in = num_chunks - grad_chunks
    if burn_in:
      carry, _ = jax.lax.scan(lambda c, _: advance(fixed, c, False), carry, None, length=burn_in)
      carry = jax.lax.stop_gradient(carry)  # truncated backprop: no gradient before these chunks
    _, losses = jax.lax.scan(lambda c, _: advance(student, c, True), carry, None,
                             length=grad_chunks)
    return jnp.mean(losses), {"rollout_last_chunk_loss": losses[-1]}

  return loss_fn


# -- stage training --------------------------------------------------------------------------------


def init_stage_state(trainable, tx) -> dict:
  params = jax.tree.map(jnp.copy, trainable)  # the model keeps its own buffers (donation)
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "ema": jax.tree.map(jnp.copy, trainable)}


def make_stage_step(loss_fn, tx, scfg):
  """Pure `train_step(state, batch, rng, frozen, teacher) -> (state, metrics)`.

  state = {"step", "params" (trainable only), "opt_state", "ema"}; frozen and teacher
  parameters are read-only inputs.
  """
  schedule = train_lib.make_schedule(scfg)

  def train_step(state, batch, rng, frozen, teacher):
    rng = jax.random.fold_in(rng, state["step"])
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], frozen, teacher, batch, rng)
    state, metrics = train_lib.apply_gradients(state, loss, grads, tx, schedule,
                                               float(scfg.ema_decay))
    return state, {**metrics, **aux}

  return train_step


def make_diagnostics_fn(graphdef, teacher_graphdef, layers, scfg, frames_per_chunk, *,
                        teacher_inputs: bool):
  """(trainable, frozen, teacher, batch, rng) -> per-layer diagnostics on teacher-forcing inputs
  (the teacher's in stage 1, the student's own in stage 2)."""
  def fn(trainable, frozen, teacher_params, batch, rng):
    student = nnx.merge(graphdef, trainable, frozen)
    x0, cond = batch["video"], batch.get("labels")
    x_t, t, _ = train_lib.noisy_inputs(x0, rng, frames_per_chunk, scfg)
    if teacher_inputs:
      record = teacher_attention_io(nnx.merge(teacher_graphdef, teacher_params), layers, x0, x_t,
                                    t, cond)
    else:
      record = attention_inputs(student, layers, x0, x_t, t, cond)
    return diagnostics(student, record)
  return fn


@dataclasses.dataclass
class StageResult:
  trainable: nnx.State            # trained parameters (EMA when ema_decay > 0)
  steps: int
  first_loss: float = float("nan")
  final_loss: float = float("nan")
  final_metrics: dict = dataclasses.field(default_factory=dict)
  seconds: float = 0.0


def _read_metrics(logdir: str) -> list[dict]:
  path = os.path.join(logdir, "metrics.jsonl")
  return read_jsonl(path) if os.path.exists(path) else []


def run_stage(name: str, stage: int, student: CausalDiT, teacher: CausalDiT, scfg, loss_factory,
              data, workdir: str, config, *, progress: bool = True,
              rollout_cfg: ml_collections.ConfigDict | None = None) -> StageResult:
  """Train one stage to scfg.num_steps (or scfg.max_minutes); resumes from <workdir>/<name>."""
  stage_dir = os.path.join(workdir, name)
  layers = student.hybrid_layers
  graphdef, trainable, frozen = nnx.split(student, trainable_filter(stage), ...)
  teacher_graphdef, teacher_params = nnx.split(teacher)
  loss_graphdef, loss_teacher_graphdef = graphdef, teacher_graphdef
  if rollout_cfg is not None:  # same parameters, bounded-cache graph
    loss_graphdef = nnx.split(abstract_model(rollout_model_config(
        rollout_cfg["student"], scfg.rollout)), trainable_filter(stage), ...)[0]
    loss_teacher_graphdef = nnx.split(abstract_model(rollout_model_config(
        rollout_cfg["teacher"], scfg.rollout)))[0]
  tx = train_lib.make_optimizer(scfg)
  state = init_stage_state(trainable, tx)
  f = student.frames_per_chunk
  step_fn = jax.jit(make_stage_step(loss_factory(loss_graphdef, loss_teacher_graphdef), tx, scfg),
                    donate_argnums=(0,))
  diag_fn = jax.jit(make_diagnostics_fn(graphdef, teacher_graphdef, layers, scfg, f,
                                        teacher_inputs=stage == 1))
  checkpointer = ckpt_lib.Checkpointer(stage_dir, keep=int(scfg.keep_checkpoints))
  start = checkpointer.latest_step() or 0
  if start:
    state, start = checkpointer.restore(ckpt_lib.abstract_like(state), start)
    logging.info("%s: resumed from step %d", name, start)
  result = StageResult(trainable=state["ema"], steps=int(start))
  if start >= scfg.num_steps:  # finished earlier: report what it logged
    checkpointer.close()
    logged = _read_metrics(os.path.join(stage_dir, "metrics"))
    if logged:
      result.first_loss, result.final_loss = logged[0]["loss"], logged[-1]["loss"]
      result.final_metrics = logged[-1]
    return result
  stage_data = dataclasses.replace(data, batch_size=int(scfg.batch_size),
                                   seed=int(config.seed) + stage)
  iterator = stage_data.iterator(start)
  rng = jax.random.key(int(config.seed) + 100 + stage)
  writer = MetricWriter(os.path.join(stage_dir, "metrics"))
  deadline = time.monotonic() + 60.0 * scfg.max_minutes if scfg.max_minutes > 0 else math.inf
  bar = tqdm(total=int(scfg.num_steps), initial=start, desc=name, unit="step",
             disable=not progress)
  # Start from settled buffers: XLA:CPU's async dispatch has been seen to hang when a big first
  # executable waits on many pending eager results (jax-ml/jax#25861).
  jax.block_until_ready((state, frozen, teacher_params))
  t0, step, loss, metrics = time.perf_counter(), start, float("nan"), {}
  try:
    while step < scfg.num_steps and time.monotonic() < deadline:
      batch = next(iterator)
      state, metrics = step_fn(state, batch, rng, frozen, teacher_params)
      step += 1
      loss = float(metrics["loss"])
      if not math.isfinite(loss):
        raise NonFiniteLossError(f"{name}: non-finite loss ({loss}) at step {step}; lower "
                                 f"convert.{name}.learning_rate")
      if step == start + 1:
        result.first_loss = loss
      bar.update(1)
      bar.set_postfix(loss=f"{loss:.5f}")
      if step % scfg.log_every == 0 or step == scfg.num_steps or step == start + 1:
        scalars = {k: float(v) for k, v in metrics.items()}
        diag = diag_fn(state["params"], frozen, teacher_params, batch,
                       jax.random.fold_in(rng, step))
        scalars.update({k: float(v) for k, v in diag.items()})
        writer.write_scalars(step, scalars)
        result.final_metrics = scalars
      if step % scfg.checkpoint_every == 0:
        checkpointer.save(step, state, config)
  finally:
    bar.close()
    writer.close()
  result.final_loss = loss
  result.final_metrics.update({k: float(v) for k, v in metrics.items()})
  if step not in checkpointer.all_steps():
    checkpointer.save(step, state, config, force=True)
  checkpointer.wait()
  checkpointer.close()
  result.trainable, result.steps = state["ema"], step
  result.seconds = time.perf_counter() - t0
  return result


# -- export ----------------------------------------------------------------------------------------


def export_model_config(student_cfg) -> ml_collections.ConfigDict:
  """The plain ARL2 model: MLP LoRA merged away; the memory-branch delta stays (see lora.py)."""
  m = copy_config(student_cfg)
  s = lora_settings(m)
  m.lora = ml_collections.ConfigDict({"rank": s.memory_rank, "alpha": s.alpha, "mlp": False,
                                      "memory": bool(s.memory_rank)})
  return m


def export_model(student: CausalDiT, student_cfg):
  """(config, model) of the merged student; its forward equals the student's (fp32 rounding)."""
  plain_cfg = export_model_config(student_cfg)
  graphdef, state = nnx.split(abstract_model(plain_cfg))
  p_flat, s_flat = flatten_state(state), flatten_state(nnx.state(student, nnx.Param))
  for path in p_flat:
    p_flat[path] = s_flat[path]
  dropped = [path_name(p) for p in s_flat
             if p not in p_flat and not any(k in ("fc1_lora", "fc2_lora") for k in p)]
  if dropped:
    raise UserError(f"export would drop student parameters {dropped}")
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(p_flat))
  plain = nnx.merge(graphdef, state)
  for block, plain_block in zip(student.blocks, plain.blocks):
    if block.ffn.fc1_lora is not None:
      merge_into(plain_block.ffn.fc1, block.ffn.fc1_lora)
      merge_into(plain_block.ffn.fc2, block.ffn.fc2_lora)
  return plain_cfg, plain


def write_export(workdir: str, model: CausalDiT, model_cfg, config, step: int) -> str:
  """A --mode=train checkpoint (params = EMA = the merged student) in <workdir>/checkpoints."""
  export_config = copy_config(config)
  export_config.model = model_cfg
  state = train_lib.init_train_state(model, train_lib.make_optimizer(export_config.train))
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=int(config.train.keep_checkpoints))
  if step in checkpointer.all_steps():  # a rerun: the stages were restored, the export is equal
    logging.warning("export at step %d already in %s: kept", step, checkpointer.directory)
  else:
    checkpointer.save(step, state, export_config, force=True)
  checkpointer.wait()
  checkpointer.close()
  return checkpointer.directory


# -- evaluation ------------------------------------------------------------------------------------


def _test_clips(config, num_clips: int, num_frames: int | None):
  """(video float [B, T, H, W, C] in [-1, 1], labels [B, M] or None) from the test split.
  Moving-digits clips are regenerated to `num_frames` from their stored dynamics."""
  from data import pipeline  # pylint: disable=g-import-not-at-top
  source = inputs_lib.make_split_source(config, "test")
  num_clips = min(int(num_clips), len(source))
  videos, labels = [], []
  for i in range(num_clips):
    ex = source[i]
    video = np.asarray(ex["video"])
    if config.data.source == "moving_digits" and num_frames:
      from data import moving_digits  # pylint: disable=g-import-not-at-top
      video = moving_digits.regenerate_clip(ex, num_frames, config.data.config)[0]
    videos.append(video)
    if "labels" in ex:
      labels.append(np.asarray(ex["labels"]))
  batch = pipeline.to_model_inputs({"video": np.stack(videos)})
  return batch["video"], (np.stack(labels).astype(np.int32) if labels else None)


def continue_clips(model: CausalDiT, sampler_cfg, video, cond, context_chunks: int,
                   seeds) -> list[np.ndarray]:
  """Teacher-forced prefix, then generation: the first `context_chunks` chunks of `video` are
  written by context passes; the rest are sampled with key(seed), the same for every model.
  Returns per seed the generated frames [B, (N - context) * F, H, W, C]."""
  f = model.frames_per_chunk
  runner = ChunkRunner(model, sampler_cfg, batch=video.shape[0], frame_hw=video.shape[2:4])
  context = runner.embed(cond)
  num_chunks = video.shape[1] // f
  return [runner.continue_from(video[:, :context_chunks * f], num_chunks - context_chunks,
                               jax.random.key(int(seed)), context) for seed in seeds]


def psnr(a, b) -> np.ndarray:
  """Per-clip PSNR (dB) of videos in [-1, 1], on the [0, 1] scale. a, b [B, T, H, W, C]."""
  mse = np.mean(np.square((np.asarray(a) - np.asarray(b)) / 2.0), axis=(1, 2, 3, 4))
  return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))


def evaluate(models: dict[str, CausalDiT], config, ecfg) -> dict:
  """PSNR on test clips: each model continues the same ground-truth prefix with the same noise.

  Returns the mean over clips of the per-clip PSNR (all generated frames) of each model against
  the ground truth (also per generated chunk) and of every pair of models. For scale: the first
  model sampled with other noise (how far apart two samples of one model are) and holding the
  last context frame (a trivial predictor).
  """
  f = next(iter(models.values())).frames_per_chunk
  video, labels = _test_clips(config, ecfg.num_clips, ecfg.num_frames)
  context_chunks = int(ecfg.context_frames) // f
  if not 1 <= context_chunks < video.shape[1] // f:
    raise UserError(f"convert.eval.context_frames={ecfg.context_frames} must leave at least one "
                    f"chunk to generate in {video.shape[1]} frames (F={f})")
  truth = video[:, context_chunks * f:]
  seed = int(ecfg.seed)
  cond = None if labels is None else jnp.asarray(labels)
  gen, first = {}, next(iter(models))
  for name, m in models.items():  # the first model also samples with other noise: the spread
    seeds = (seed, seed + 1) if name == first else (seed,)
    outs = continue_clips(m, config.sampler, jnp.asarray(video), cond, context_chunks, seeds)
    gen[name] = outs[0]
    if len(outs) > 1:
      gen[f"{name}_other_noise"] = outs[1]
  gen["last_frame"] = np.repeat(video[:, context_chunks * f - 1:context_chunks * f],
                                truth.shape[1], axis=1)  # baseline: hold the last context frame
  out = {"num_clips": int(video.shape[0]), "context_frames": context_chunks * f,
         "generated_frames": int(truth.shape[1])}
  for name, g in gen.items():
    out[f"psnr_{name}_vs_truth"] = float(np.mean(psnr(g, truth)))
    out[f"psnr_{name}_vs_truth_per_chunk"] = [
        float(np.mean(psnr(g[:, i:i + f], truth[:, i:i + f]))) for i in range(0, g.shape[1], f)]
  names = [n for n in gen if n != "last_frame"]
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      out[f"psnr_{b}_vs_{a}"] = float(np.mean(psnr(gen[b], gen[a])))
  return out


# -- main ------------------------------------------------------------------------------------------


def _teacher_forcing_check(a: CausalDiT, b: CausalDiT, batch, key, scfg) -> float:
  """Max abs difference / max abs of two models' teacher-forcing outputs on one batch."""
  @nnx.jit
  def rel_err(a, b, batch):
    x0 = batch["video"]
    x_t, t, _ = train_lib.noisy_inputs(x0, key, a.frames_per_chunk, scfg)
    ya = a.teacher_forcing(x0, x_t, t, batch.get("labels"))
    yb = b.teacher_forcing(x0, x_t, t, batch.get("labels"))
    return jnp.max(jnp.abs(ya - yb)) / jnp.maximum(jnp.max(jnp.abs(ya)), 1e-30)
  return float(rel_err(a, b, batch))


def convert_main(config, workdir: str, *, progress: bool = True) -> dict:
  """--mode=convert: teacher checkpoint -> stage 1 -> stage 2 -> export -> eval (see module doc)."""
  from hybrid_video import sample as sample_lib  # pylint: disable=g-import-not-at-top
  ccfg = config.convert
  if ccfg.table_only:  # shapes only: the parameter table of config.model as the teacher
    teacher_cfg = copy_config(config.model)
    teacher_cfg.hybrid.ratio, teacher_cfg.hybrid.layers = 0.0, None
    table = format_table(parameter_table(teacher_cfg, ccfg))
    print(table)
    return {"table": table}
  if ccfg.stage2.mode not in STAGE2_MODES:
    raise UserError(f"convert.stage2.mode={ccfg.stage2.mode!r} must be one of {STAGE2_MODES}")
  teacher, teacher_cfg, teacher_step = load_teacher(config)
  os.makedirs(workdir, exist_ok=True)
  s1_cfg = student_model_config(teacher_cfg, ccfg, lora=False)
  s2_cfg = student_model_config(teacher_cfg, ccfg, lora=True)
  table = format_table(parameter_table(teacher_cfg, ccfg))
  print(f"teacher: {ccfg.teacher_workdir} step {teacher_step}; hybrid layers "
        f"{list(s1_cfg.hybrid.layers)} of {teacher_cfg.num_layers}\n{table}")
  with open(os.path.join(workdir, "params.txt"), "w") as fh:
    fh.write(table + "\n")
  data = inputs_lib.make_train_inputs(config)
  data.check_model(teacher)
  summary = {"teacher_step": teacher_step, "hybrid_layers": list(s1_cfg.hybrid.layers)}

  student = convert(teacher, s1_cfg, int(ccfg.seed))
  s1 = run_stage("stage1", 1, student, teacher, ccfg.stage1,
                 lambda g, tg: make_alignment_loss(g, tg, student.hybrid_layers, ccfg.stage1,
                                                   student.frames_per_chunk),
                 data, workdir, config, progress=progress)
  summary["stage1"] = {"steps": s1.steps, "first_loss": s1.first_loss,
                       "final_loss": s1.final_loss, "seconds": s1.seconds,
                       **{k: v for k, v in s1.final_metrics.items() if "align_loss" in k}}

  student = convert(teacher, s2_cfg, int(ccfg.seed))
  nnx.update(student, s1.trainable)
  s2c = ccfg.stage2
  rollout_cfg = None
  if s2c.mode == "rollout":
    chunk_shape = (int(s2c.batch_size), student.frames_per_chunk, *data.example_shape[1:3],
                   student.out_channels)
    factory = lambda g, tg: make_rollout_loss(g, tg, config.sampler, s2c, chunk_shape)
    rollout_cfg = {"student": s2_cfg, "teacher": teacher_cfg}
  else:
    factory = lambda g, tg: make_distill_loss(g, tg, s2c, student.frames_per_chunk)
  s2 = run_stage("stage2", 2, student, teacher, s2c, factory, data, workdir, config,
                 progress=progress, rollout_cfg=rollout_cfg)
  nnx.update(student, s2.trainable)
  summary["stage2"] = {"mode": s2c.mode, "steps": s2.steps, "first_loss": s2.first_loss,
                       "final_loss": s2.final_loss, "seconds": s2.seconds,
                       **{k: v for k, v in s2.final_metrics.items() if "flow_loss" in k}}

  plain_cfg, plain = export_model(student, s2_cfg)
  batch = next(dataclasses.replace(data, batch_size=2).iterator(0))
  summary["export_rel_err"] = _teacher_forcing_check(student, plain, batch, jax.random.key(0),
                                                     ccfg.stage2)
  directory = write_export(workdir, plain, plain_cfg, config, s1.steps + s2.steps)
  print(f"stage 1: loss {s1.first_loss:.4g} -> {s1.final_loss:.4g} ({s1.steps} steps, "
        f"{s1.seconds:.0f} s)\nstage 2 ({s2c.mode}): loss {s2.first_loss:.4g} -> "
        f"{s2.final_loss:.4g} ({s2.steps} steps, {s2.seconds:.0f} s)\nexport: {directory} "
        f"(merged vs unmerged rel. err "
        f"{summary['export_rel_err']:.2e}); sample it with --mode=sample --workdir={workdir}")

  if ccfg.eval.num_clips > 0:
    summary["eval"] = evaluate({"teacher": teacher, "student": plain}, config, ccfg.eval)
    ev = summary["eval"]
    print(f"eval ({ev['num_clips']} test clips, {ev['context_frames']} context frames, "
          f"{ev['generated_frames']} generated): PSNR vs truth teacher "
          f"{ev['psnr_teacher_vs_truth']:.2f} dB, student {ev['psnr_student_vs_truth']:.2f} dB, "
          f"last frame {ev['psnr_last_frame_vs_truth']:.2f} dB; student vs teacher "
          f"{ev['psnr_student_vs_teacher']:.2f} dB (teacher vs itself with other noise "
          f"{ev['psnr_teacher_other_noise_vs_teacher']:.2f} dB)")
  if ccfg.sample_frames > 0:
    use_labels = teacher_cfg.cond == "labels"
    for name, model in (("teacher", teacher), ("student", plain)):
      path = os.path.join(workdir, "samples", f"{name}_{ccfg.sample_frames}f.mp4")
      stats = sample_lib.write_video(model, config, path, num_frames=int(ccfg.sample_frames),
                                     use_labels=use_labels, progress=progress)
      sample_lib.report(path, stats)
      summary[f"{name}_video"] = path
  with open(os.path.join(workdir, "summary.json"), "w") as fh:
    json.dump(summary, fh, indent=2)
  return summary
