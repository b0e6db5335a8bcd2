"""Looking inside the teacher-forcing forward: per-layer taps and hybrid-layer diagnostics.

- `tapped_teacher_forcing` runs a model's own forward with chosen blocks' self-attention calls
  replaced, so what each layer sees can be recorded exactly (conversion's stage 1 trains on it).
- `diagnostics` gives, per hybrid layer, branch magnitudes, the output gate's statistics and the
  per-head retention over one chunk, exp(sum of g over its L tokens) (method doc §8: logged in
  training and in conversion).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from hybrid_video.nn.model import CausalDiT


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
  # The taps record Python values: no nested transform (remat, a scan over layers) around the
  # blocks while they run.
  switched_off = {k: getattr(model, k) for k in ("remat", "scan_layers") if getattr(model, k, None)}
  try:
    for k in switched_off:
      setattr(model, k, False)
    for i, fn in taps.items():
      model.blocks[i].self_attn = _Tap(saved[i], fn)
    return model.teacher_forcing(clean, noisy, t, cond)
  finally:
    for i, attn in saved.items():
      model.blocks[i].self_attn = attn
    for k, v in switched_off.items():
      setattr(model, k, v)


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


def retention_scalars(model: CausalDiT, clean, noisy, t, cond) -> dict[str, jax.Array]:
  """Per hybrid layer i: 'layer{i}/retention_mean' and 'layer{i}/retention_h{h}' on one batch of
  the teacher-forcing forward ({} for an all-softmax model)."""
  if not model.hybrid_layers:
    return {}
  d = diagnostics(model, attention_inputs(model, model.hybrid_layers, clean, noisy, t, cond))
  return {k: v for k, v in d.items() if "/retention" in k}
