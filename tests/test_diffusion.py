"""Flow matching (hybrid_video/diffusion.py): schedule, noising, loss target and the samplers.

Conventions under test (method doc §2, §5): x_t = (1 - t) x0 + t eps, target velocity
v = eps - x0, so x0 = x_t - t v; shift t' = s t / (1 + (s - 1) t); the paper's few-step
schedule [1000, 750, 500, 250] with shift 5.

The samplers run against a perfect velocity oracle for a known x0: v(x, t) = (x - x0) / t,
the exact flow of the data point x0 (x_t - x0 = t (eps - x0)). With it the few-step sampler's
x0 prediction is x0 at every pass and Euler follows the straight path x0 + t (eps - x0) exactly,
so both must return x0 to fp32 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from hybrid_video import diffusion
from hybrid_video.errors import UserError

CHUNK_SHAPE = (2, 2, 8, 8, 1)  # B, F, Hi, Wi, C


def sampler_cfg(kind="few_step", timesteps=(1000, 750, 500, 250), shift=5.0, num_steps=4,
                clip_x0=False):
  return ml_collections.ConfigDict(dict(kind=kind, timesteps=timesteps, shift=shift,
                                        num_steps=num_steps, clip_x0=clip_x0))


# -- schedule --------------------------------------------------------------------------------------


def test_shift_formula():
  t = np.linspace(0.0, 1.0, 11)
  for s in (1.0, 3.0, 5.0):
    np.testing.assert_allclose(diffusion.shift_time(t, s), s * t / (1 + (s - 1) * t), atol=1e-15)
    # The same map as "multiply the odds t / (1 - t) by s" (SD3 / Wan), away from t = 1.
    ts = diffusion.shift_time(t[:-1], s)
    np.testing.assert_allclose(ts / (1 - ts), s * t[:-1] / (1 - t[:-1]), rtol=1e-12)
  np.testing.assert_array_equal(diffusion.shift_time(t, 1.0), t)
  assert diffusion.shift_time(0.5, 5.0) == pytest.approx(5 / 6)
  assert diffusion.shift_time(0.0, 5.0) == 0.0 and diffusion.shift_time(1.0, 5.0) == 1.0


def test_paper_few_step_times():
  times = diffusion.sampler_times(sampler_cfg())
  assert times == pytest.approx((1.0, 0.9375, 5 / 6, 0.625), abs=1e-12)
  assert all(isinstance(t, float) for t in times)
  # Without the shift the times are the timesteps / 1000.
  assert diffusion.sampler_times(sampler_cfg(shift=1.0)) == pytest.approx((1.0, 0.75, 0.5, 0.25))


def test_euler_times():
  assert diffusion.sampler_times(sampler_cfg("euler", shift=1.0)) == pytest.approx(
      (1.0, 0.75, 0.5, 0.25, 0.0), abs=1e-12)
  shifted = diffusion.sampler_times(sampler_cfg("euler", shift=5.0))
  assert shifted == pytest.approx((1.0, 0.9375, 5 / 6, 0.625, 0.0), abs=1e-12)
  assert len(diffusion.sampler_times(sampler_cfg("euler", num_steps=16))) == 17


@pytest.mark.parametrize("kw, match", [
    (dict(timesteps=()), "timesteps"),
    (dict(timesteps=(1000, 0)), "timesteps"),
    (dict(timesteps=(1200,)), "timesteps"),
    (dict(kind="euler", num_steps=0), "num_steps"),
    (dict(kind="ddim"), "kind"),
])
def test_bad_sampler_configs(kw, match):
  with pytest.raises(ValueError, match=match):
    diffusion.sampler_times(sampler_cfg(**kw))


def test_training_noise_levels():
  tcfg = ml_collections.ConfigDict(dict(t_logit_mean=0.0, t_logit_std=1.0))
  t = diffusion.sample_chunk_times(jax.random.key(0), 512, 4, tcfg)
  assert t.shape == (512, 4) and float(t.min()) > 0 and float(t.max()) < 1
  assert abs(float(jnp.median(t)) - 0.5) < 0.03  # logit-normal with mean 0: median 1/2
  tcfg.t_logit_mean, tcfg.t_logit_std = 1.0, 0.0
  np.testing.assert_allclose(diffusion.sample_chunk_times(jax.random.key(0), 2, 3, tcfg),
                             1 / (1 + np.exp(-1.0)), rtol=1e-6)


# -- noising and the loss target -----------------------------------------------------------------


def test_add_noise_interpolates_per_frame():
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((2, 3, 4, 4, 1)).astype(np.float32)
  eps = rng.standard_normal(x0.shape).astype(np.float32)
  t = np.array([[0.0, 0.25, 1.0], [0.5, 0.9, 0.1]], np.float32)
  x_t = np.asarray(diffusion.add_noise(x0, eps, t))
  for b in range(2):
    for f in range(3):
      np.testing.assert_allclose(x_t[b, f], (1 - t[b, f]) * x0[b, f] + t[b, f] * eps[b, f],
                                 rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(x_t[0, 0], x0[0, 0])   # t = 0: the clean frame
  np.testing.assert_array_equal(x_t[0, 2], eps[0, 2])  # t = 1: pure noise


class _VelocityFromNoisy:
  """Stands in for the model in flow_matching_loss: predicts sign * (x_t - x0) / t, which is
  sign * (eps - x0) exactly when x_t = (1 - t) x0 + t eps."""

  frames_per_chunk = 2

  def __init__(self, sign):
    self.sign = sign

  def teacher_forcing(self, clean, noisy, t, cond):
    t = jnp.repeat(t, self.frames_per_chunk, axis=1)[:, :, None, None, None]
    return self.sign * (noisy - clean) / t


def test_flow_matching_target_is_eps_minus_x0():
  tcfg = ml_collections.ConfigDict(dict(t_logit_mean=0.0, t_logit_std=1.0))
  x0 = jax.random.uniform(jax.random.key(1), (4, 6, 8, 8, 1), minval=-1, maxval=1)
  batch = {"video": x0, "labels": jnp.zeros((4, 1), jnp.int32)}
  right = diffusion.flow_matching_loss(_VelocityFromNoisy(1.0), batch, jax.random.key(2), tcfg)
  wrong = diffusion.flow_matching_loss(_VelocityFromNoisy(-1.0), batch, jax.random.key(2), tcfg)
  assert float(right) < 1e-8, float(right)
  assert float(wrong) > 1.0  # 4 E|eps - x0|^2 ~ 5: the sign is observable


class _LabelScaled:
  """Stands in for the model in velocity_loss with train.model_guidance: predicts
  p * ((x_t - x0) / t + 0.1 * label), so the label's effect v(label) - v(null) depends on the
  parameter p (a missing stop-gradient would show in dloss/dp)."""

  frames_per_chunk = 2
  null_label_index = 10

  def __init__(self, p):
    self.p = p

  def teacher_forcing(self, clean, noisy, t, cond):
    t = jnp.repeat(t, self.frames_per_chunk, axis=1)[:, :, None, None, None]
    label = cond.astype(jnp.float32).reshape(-1, 1, 1, 1, 1)
    return self.p * ((noisy - clean) / t + 0.1 * label)


def test_model_guidance_target_and_its_stop_gradient():
  """train.model_guidance = w: clips with a label train on eps - x0 + w sg(v(label) - v(null));
  clips with the null label on eps - x0; no gradient flows through the guidance term."""
  w, p = 0.75, 1.3
  x0 = jax.random.uniform(jax.random.key(1), (2, 4, 8, 8, 1), minval=-1, maxval=1)
  batch = {"video": x0, "labels": jnp.array([[3], [10]], jnp.int32)}
  noisy = diffusion.noisy_inputs(x0, jax.random.key(2), 2, ml_collections.ConfigDict(
      dict(t_logit_mean=0.0, t_logit_std=1.0)))
  x_t, t, eps = noisy
  u = (x_t - x0) / jnp.repeat(t, 2, axis=1)[:, :, None, None, None]
  label = jnp.array([3.0, 10.0]).reshape(-1, 1, 1, 1, 1)
  pred = p * (u + 0.1 * label)
  delta = p * 0.1 * (label - 10.0) * jnp.array([1.0, 0.0]).reshape(-1, 1, 1, 1, 1)
  target = eps - x0 + w * delta
  want = jnp.mean(jnp.square(pred - target))
  want_grad = jnp.mean(2 * (pred - target) * (u + 0.1 * label))  # target held fixed
  loss, grad = jax.value_and_grad(
      lambda q: diffusion.velocity_loss(_LabelScaled(q), batch, noisy, w))(p)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5)
  plain = diffusion.velocity_loss(_LabelScaled(p), batch, noisy)
  assert abs(float(plain) - float(want)) > 1e-2  # the guidance term is observable
  with pytest.raises(UserError, match="model_guidance"):
    diffusion.velocity_loss(_LabelScaled(p), {"video": x0}, noisy, w)


# -- samplers against a perfect velocity oracle ----------------------------------------------------


class _OracleModel(nnx.Module):
  """model.step for one known data chunk x0: v = (x - x0) / t; records every call (as it runs:
  the sampler's denoising passes are a lax.scan, traced once)."""

  calls: list = []  # (x, t, write) per call, class-level so it survives split/merge

  def __init__(self, x0):
    self.x0 = nnx.Variable(jnp.asarray(x0))

  def step(self, x, t, context, carry, *, write):
    record = lambda x, t: _OracleModel.calls.append((np.asarray(x), np.asarray(t), write))
    jax.debug.callback(record, x, t, ordered=True)
    if write:
      return jnp.zeros_like(x), {**carry, "chunk": carry["chunk"] + 1}
    tt = t[:, None, None, None, None]
    return (x - self.x0[...]) / tt, carry


def _run_sampler(scfg, seed=0):
  x0 = jax.random.uniform(jax.random.key(seed), CHUNK_SHAPE, minval=-1, maxval=1)
  graphdef, state = nnx.split(_OracleModel(x0))
  fn = diffusion.sample_chunk_fn(graphdef, scfg, CHUNK_SHAPE)
  _OracleModel.calls = []
  carry, frames = fn(state, {"chunk": jnp.zeros((), jnp.int32)}, jax.random.key(seed + 1), None)
  return np.asarray(x0), carry, np.asarray(frames), list(_OracleModel.calls)


@pytest.mark.parametrize("clip", [False, True])
def test_few_step_sampler_returns_x0_with_a_perfect_velocity(clip):
  scfg = sampler_cfg(clip_x0=clip)
  times = diffusion.sampler_times(scfg)
  x0, carry, frames, calls = _run_sampler(scfg)
  np.testing.assert_allclose(frames, x0, atol=1e-5)
  # One denoising pass per time, then the context pass at t = 0 on the returned chunk.
  assert [c[2] for c in calls] == [False] * len(times) + [True]
  noises = []
  for (x, t, _), t_expected in zip(calls, times):
    np.testing.assert_allclose(t, t_expected, rtol=1e-6)
    # Re-noising: x = (1 - t) x0 + t eps with fresh eps ~ N(0, 1), independent of x0 and of
    # the noise of the passes before.
    residual = ((x - (1 - t_expected) * x0) / t_expected).ravel()
    assert abs(residual.std() - 1.0) < 0.1, (t_expected, residual.std())
    for other in [x0.ravel()] + noises:
      assert abs(np.corrcoef(residual, other)[0, 1]) < 0.2
    noises.append(residual)
  np.testing.assert_array_equal(calls[-1][1], 0.0)
  np.testing.assert_array_equal(calls[-1][0], frames)
  assert int(carry["chunk"]) == 1


@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_euler_sampler_reaches_x0_with_a_perfect_velocity(shift):
  scfg = sampler_cfg("euler", shift=shift, num_steps=6)
  times = diffusion.sampler_times(scfg)
  x0, _, frames, calls = _run_sampler(scfg, seed=3)
  np.testing.assert_allclose(frames, x0, atol=1e-5)
  # The Euler iterates lie on the straight path x0 + t (eps - x0), eps = the starting noise.
  eps = calls[0][0]
  assert len(calls) == len(times)  # len(times) - 1 velocity passes + the context pass
  for (x, t, _), t_expected in zip(calls[:-1], times[:-1]):
    np.testing.assert_allclose(x, x0 + t_expected * (eps - x0), atol=1e-5)
  np.testing.assert_array_equal(calls[-1][0], frames)


# -- classifier-free guidance ------------------------------------------------------------------------


class _GuidedOracle(nnx.Module):
  """model.step whose data depends on the condition: v = (x - context) / t, so a sampler guided
  with scale w reaches x0 = null + w (cond - null) (velocities are affine in the target)."""

  null_label_index = 10

  def __init__(self, null_value):
    self.null_value = nnx.Variable(jnp.asarray(null_value, jnp.float32))

  def null_condition(self, batch):
    return jnp.full((batch, 1, 1, 1, 1), self.null_value[...])

  def step(self, x, t, context, carry, *, write):
    if write:
      return jnp.zeros_like(x), {**carry, "chunk": carry["chunk"] + 1}
    return (x - context) / t[:, None, None, None, None], carry


def _guided_frames(oracle, kind, guidance):
  scfg = sampler_cfg(kind, shift=1.0, num_steps=5)
  scfg.guidance = guidance
  graphdef, state = nnx.split(oracle)
  fn = diffusion.sample_chunk_fn(graphdef, scfg, CHUNK_SHAPE)
  cond = jnp.full((CHUNK_SHAPE[0], 1, 1, 1, 1), 0.5)
  _, frames = fn(state, {"chunk": jnp.zeros((), jnp.int32)}, jax.random.key(0), cond)
  return np.asarray(frames)


@pytest.mark.parametrize("kind", ["euler", "few_step"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_guided_sampler_reaches_null_plus_w_times_the_difference(kind, guidance):
  frames = _guided_frames(_GuidedOracle(-0.25), kind, guidance)
  np.testing.assert_allclose(frames, -0.25 + guidance * (0.5 + 0.25), atol=1e-5)


def test_guidance_is_ignored_by_a_model_without_a_null_label():
  oracle = _GuidedOracle(-0.25)
  oracle.null_label_index = None  # e.g. a checkpoint trained before model.null_label
  np.testing.assert_allclose(_guided_frames(oracle, "euler", 3.0), 0.5, atol=1e-5)


def test_label_dropout_replaces_whole_clips_labels_by_the_null_label():
  labels = jnp.arange(4000, dtype=jnp.int32).reshape(2000, 2) % 10
  batch = {"video": jnp.zeros((2000, 1)), "labels": labels}
  assert diffusion.drop_labels(batch, jax.random.key(0), 0.0, None) is batch
  out = np.asarray(diffusion.drop_labels(batch, jax.random.key(0), 0.25, 10)["labels"])
  dropped = out[:, 0] == 10
  assert 0.2 < dropped.mean() < 0.3
  assert np.all(out[dropped] == 10)  # both labels of a clip together
  np.testing.assert_array_equal(out[~dropped], np.asarray(labels)[~dropped])
  with pytest.raises(Exception, match="null_label"):
    diffusion.drop_labels(batch, jax.random.key(0), 0.25, None)
