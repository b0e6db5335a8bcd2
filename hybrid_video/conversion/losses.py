"""Conversion losses on the teacher-forcing forward (taps and diagnostics:
hybrid_video/diagnostics.py).

- Stage 1 (alignment): each hybrid layer gets the teacher's own input to that layer (captured by
  tapping the teacher's forward) and matches the teacher's softmax output before W_o.
- Stage 2 (distillation): the student's prediction matches the frozen teacher's, either by
  teacher forcing on dataset clips or on the student's own rollouts through the streaming path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from hybrid_video.conversion.surgery import copy_config
from hybrid_video.diagnostics import attention_inputs, diagnostics, teacher_attention_io
from hybrid_video.diffusion import (add_noise, batch_condition, noisy_inputs, sample_chunk_fn,
                                    sample_chunk_times)
from hybrid_video.errors import UserError
from hybrid_video.nn.model import REMAT_POLICIES, CausalDiT, stack_states

# -- losses ----------------------------------------------------------------------------------------


def _mse(a, b):
  return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))


def alignment_loss(student: CausalDiT, record: dict):
  """Stage 1: sum over hybrid layers of the MSE between the layer's pre-W_o output and the
  teacher's, on the teacher's inputs (clean and noisy copies weigh equally).

  With model.scan_layers the layers' losses, independent given the record, are one lax.scan
  per group of layers of one structure (under jax.checkpoint with model.remat), so the backward
  holds one layer's buffers at a time; unrolled, XLA:CPU held every layer's at once.
  """
  per_layer = {}
  groups = _attention_groups(student, sorted(record)) if student.scan_layers else None
  for layers in groups or [[i] for i in record]:
    if len(layers) == 1:
      i = layers[0]
      per_layer[f"layer{i}/align_loss"] = _align(student.blocks[i].self_attn, record[i])
      continue
    splits = [nnx.split(student.blocks[i].self_attn) for i in layers]
    graphdef = splits[0][0]
    states = stack_states([state for _, state in splits])
    shared = {k: record[layers[0]][k] for k in ("angles", "num_chunks")}
    tapped = {k: jnp.stack([record[i][k] for i in layers])
              for k in ("x_clean", "x_noisy", "y_clean", "y_noisy")}

    def one_layer(state, r):
      return _align(nnx.merge(graphdef, state), {**r, **shared})
    if student.remat:
      one_layer = jax.checkpoint(one_layer, policy=REMAT_POLICIES[student.remat_policy])
    _, losses = jax.lax.scan(lambda c, xs: (c, one_layer(*xs)), None, (states, tapped))
    per_layer.update({f"layer{i}/align_loss": losses[j] for j, i in enumerate(layers)})
  return sum(per_layer.values()), per_layer


def _align(attn, r):
  yc, yn = attn.teacher_forcing_heads(r["x_clean"], r["x_noisy"], r["angles"], r["num_chunks"])
  return 0.5 * (_mse(yc, r["y_clean"]) + _mse(yn, r["y_noisy"]))


def _attention_groups(student: CausalDiT, layers) -> list[list[int]]:
  """`layers` grouped by the structure of their self-attention (layer order kept)."""
  groups: dict = {}
  for i in layers:
    groups.setdefault(nnx.graphdef(student.blocks[i].self_attn), []).append(i)
  return list(groups.values())


def make_alignment_loss(graphdef, teacher_graphdef, layers, scfg, frames_per_chunk):
  def loss_fn(trainable, frozen, teacher_params, batch, rng):
    student = nnx.merge(graphdef, trainable, frozen)
    teacher = nnx.merge(teacher_graphdef, teacher_params)
    x0 = batch["video"]
    x_t, t, _ = noisy_inputs(x0, rng, frames_per_chunk, scfg)
    record = teacher_attention_io(teacher, layers, x0, x_t, t, batch_condition(batch))
    record = {i: {k: v if k == "num_chunks" else jax.lax.stop_gradient(v) for k, v in r.items()}
              for i, r in record.items()}
    return alignment_loss(student, record)
  return loss_fn


def make_distill_loss(graphdef, teacher_graphdef, scfg, frames_per_chunk):
  """Stage 2, teacher forcing: MSE between student and teacher predictions on dataset clips."""
  def loss_fn(trainable, frozen, teacher_params, batch, rng):
    student = nnx.merge(graphdef, trainable, frozen)
    teacher = nnx.merge(teacher_graphdef, teacher_params)
    x0, cond = batch["video"], batch_condition(batch)
    x_t, t, eps = noisy_inputs(x0, rng, frames_per_chunk, scfg)
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
    cond = batch_condition(batch)
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
        t = sample_chunk_times(k_t, b, 1, scfg)[:, 0]
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


def make_diagnostics_fn(graphdef, teacher_graphdef, layers, scfg, frames_per_chunk, *,
                        teacher_inputs: bool):
  """(trainable, frozen, teacher, batch, rng) -> per-layer diagnostics on teacher-forcing inputs
  (the teacher's in stage 1, the student's own in stage 2)."""
  def fn(trainable, frozen, teacher_params, batch, rng):
    student = nnx.merge(graphdef, trainable, frozen)
    x0, cond = batch["video"], batch_condition(batch)
    x_t, t, _ = noisy_inputs(x0, rng, frames_per_chunk, scfg)
    if teacher_inputs:
      record = teacher_attention_io(nnx.merge(teacher_graphdef, teacher_params), layers, x0, x_t,
                                    t, cond)
    else:
      record = attention_inputs(student, layers, x0, x_t, t, cond)
    return diagnostics(student, record)
  return fn
