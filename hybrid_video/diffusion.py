"""Flow matching: noise schedule, noising, the training loss and the per-chunk sampler step.

x_t = (1 - t) x0 + t eps, the model predicts the velocity eps - x0 (Wan), so
x0_hat = x_t - t * v. Noise levels t are in [0, 1]; the paper's timesteps are t * 1000.
"""

from __future__ import annotations

import logging
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybrid_video.errors import UserError


def shift_time(t, shift: float):
  """Timestep shift t' = s t / (1 + (s - 1) t) (Wan / SD3)."""
  return shift * t / (1.0 + (shift - 1.0) * t)


def sampler_times(scfg) -> tuple[float, ...]:
  """Noise levels visited by the sampler, highest first, as Python floats."""
  if scfg.kind == "few_step":
    if not scfg.timesteps:
      raise UserError("sampler.timesteps must not be empty")
    ts = np.asarray(scfg.timesteps, np.float64) / 1000.0
    if np.any(ts <= 0) or np.any(ts > 1):
      raise UserError(f"sampler.timesteps={tuple(scfg.timesteps)} must be in (0, 1000]")
  elif scfg.kind == "euler":
    if scfg.num_steps < 1:
      raise UserError(f"sampler.num_steps={scfg.num_steps} must be >= 1")
    ts = np.linspace(1.0, 0.0, scfg.num_steps + 1)
  else:
    raise UserError(f"sampler.kind={scfg.kind!r} must be 'few_step' or 'euler'")
  return tuple(float(x) for x in shift_time(ts, scfg.shift))


def add_noise(x0, eps, t):
  """x_t for per-chunk noise levels. x0, eps [B, T, ...]; t [B, T] (per frame)."""
  t = t.reshape(*t.shape, *([1] * (x0.ndim - t.ndim)))
  return (1.0 - t) * x0 + t * eps


def sample_chunk_times(key, batch: int, num_chunks: int, tcfg) -> jax.Array:
  """Per-chunk noise levels t [B, N] = sigmoid(N(mean, std)) (logit-normal)."""
  z = tcfg.t_logit_mean + tcfg.t_logit_std * jax.random.normal(key, (batch, num_chunks))
  return jax.nn.sigmoid(z)


def noisy_inputs(x0, key, frames_per_chunk: int, tcfg):
  """x_t, per-chunk noise levels t [B, N] (the training distribution) and eps, for x0 [B, T, ...]."""
  b, frames = x0.shape[:2]
  k_t, k_eps = jax.random.split(key)
  t = sample_chunk_times(k_t, b, frames // frames_per_chunk, tcfg)
  eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
  return add_noise(x0, eps, jnp.repeat(t, frames_per_chunk, axis=1)), t, eps


def batch_condition(batch):
  """A batch's conditioning: text embeddings ("cond") or labels ("labels"), or None."""
  return batch["cond"] if "cond" in batch else batch.get("labels")


def drop_labels(batch, key, rate: float, null_label: int | None):
  """Classifier-free guidance training: each clip's labels become the null label with
  probability `rate` (0: the batch unchanged)."""
  if not rate:
    return batch
  if null_label is None or "labels" not in batch:
    raise UserError("train.label_dropout needs labels and a model with model.null_label=True")
  labels = batch["labels"]
  drop = jax.random.bernoulli(key, rate, (labels.shape[0],) + (1,) * (labels.ndim - 1))
  return {**batch, "labels": jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)}


def velocity_loss(model, batch, noisy, model_guidance: float = 0.0) -> jax.Array:
  """MSE of the predicted velocity against eps - x0 on the noisy half of the teacher-forcing
  input [clean ; noisy]. noisy = (x_t, t, eps) from `noisy_inputs`.

  model_guidance = w > 0 (train.model_guidance; label models with a null label): the target
  becomes eps - x0 + w sg(v(label) - v(null)) (Tang et al. 2025, "Diffusion Models without
  Classifier-free Guidance"; the term is zero for clips that label_dropout gave the null
  label), one more forward pass with the null label and no gradient. Its fixed point is the
  classifier-free-guided velocity at scale 1 / (1 - w), so such a model samples with
  sampler.guidance = 1.
  """
  x0 = batch["video"]
  x_t, t, eps = noisy
  if model_guidance and (getattr(model, "null_label_index", None) is None
                         or "labels" not in batch):
    raise UserError("train.model_guidance needs labels and a model with model.null_label=True")
  cond = batch_condition(batch)
  pred = model.teacher_forcing(x0, x_t, t, cond).astype(jnp.float32)
  target = eps - x0
  if model_guidance:
    null = jnp.full_like(batch["labels"], model.null_label_index)
    pred_null = model.teacher_forcing(x0, x_t, t, null).astype(jnp.float32)
    target = target + model_guidance * jax.lax.stop_gradient(pred - pred_null)
  return jnp.mean(jnp.square(pred - target))


def model_guidance_weight(tcfg) -> float:
  """train.model_guidance (0 when absent: configs older than it)."""
  return float(tcfg.get("model_guidance", 0.0) or 0.0)


def flow_matching_loss(model, batch, key, tcfg):
  """The flow-matching loss of one batch: noise drawn with `key`, then `velocity_loss`.
  batch["video"] [B, T, H, W, C]; batch["labels"] or batch["cond"]."""
  return velocity_loss(model, batch, noisy_inputs(batch["video"], key, model.frames_per_chunk,
                                                  tcfg),
                       model_guidance_weight(tcfg))


def sample_chunk_fn(graphdef, scfg, chunk_shape, trace_counter: list | None = None) -> Callable:
  """Build `(state, carry, key, context) -> (carry, frames)` for one chunk.

  Runs every denoising pass (memory read only), then the context pass at t = 0 on the denoised
  chunk, which writes K/V and S_n. chunk_shape = (B, F, Hi, Wi, C). The chunk's noise comes
  from fold_in(key, chunk index), so the same executable serves every chunk. The passes are a
  lax.scan over the noise levels: one model body to compile, however many steps. With
  sampler.guidance = w != 1 and a model with a null label, each pass also runs the null label
  (classifier-free guidance) and uses v_null + w (v - v_null); the context pass writes with the
  real condition.
  """
  times = sampler_times(scfg)
  guidance = float(scfg.get("guidance", 1.0))
  n = len(times)
  if scfg.kind == "few_step":  # x0 = x - t v, re-noised to the next level (none after the last)
    levels = (times, times[1:] + (0.0,))
  else:  # Euler: x += (t_next - t) v, ending at t = 0 (times[-1])
    levels = (times[:-1], times[1:])
  levels = tuple(np.asarray(l, np.float32) for l in levels)

  def sample_chunk(state, carry, key, context):
    if trace_counter is not None:
      trace_counter.append(1)  # runs once per trace: counts compiles
    model = nnx.merge(graphdef, state)
    b = chunk_shape[0]
    keys = jax.random.split(jax.random.fold_in(key, carry["chunk"]), n)
    x = jax.random.normal(keys[0], chunk_shape, jnp.float32)
    # Guidance needs a condition to guide by and a null label to guide against: other models
    # (unconditional, text, or label models trained without model.null_label) sample unguided.
    guided = guidance != 1.0 and model.null_label_index is not None
    if guidance != 1.0 and not guided:
      logging.warning("sampler.guidance=%s ignored: the model has no null label (trained "
                      "without model.null_label)", guidance)
    null_context = model.null_condition(b) if guided else None

    def denoise(xc, level):
      # Denoising pass: reads memory; returns the carry changed only by the write ablation.
      x, carry = xc
      t, t_next, k = level
      tb = jnp.full((b,), t, jnp.float32)
      v, new_carry = model.step(x, tb, context, carry, write=False)
      v = v.astype(jnp.float32)
      if null_context is not None:
        v_null, _ = model.step(x, tb, null_context, carry, write=False)
        v = v_null.astype(jnp.float32) + guidance * (v - v_null.astype(jnp.float32))
      carry = new_carry
      if scfg.kind == "few_step":
        x = (1.0 - t_next) * (x - t * v) + t_next * jax.random.normal(k, chunk_shape)
      else:
        x = x + (t_next - t) * v
      return (x, carry), None

    # few_step re-noises step i with keys[i + 1] (the last step's key is unused: t_next = 0).
    step_keys = keys[np.minimum(np.arange(len(levels[0])) + 1, n - 1)]
    (x0, carry), _ = jax.lax.scan(denoise, (x, carry), (*levels, step_keys))
    if scfg.clip_x0:
      x0 = jnp.clip(x0, -1.0, 1.0)
    _, carry = model.step(x0, jnp.zeros((b,), jnp.float32), context, carry, write=True)
    return carry, x0

  return sample_chunk
