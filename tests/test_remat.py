"""model.remat and model.scan_layers: rematerialised or scanned blocks give the same loss and
gradients, for training and for the conversion stages (whose student merges trainable, frozen
and LoRA parameters)."""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest
from flax import nnx

from configs.convert import convert_config, stage_config
from configs.default import get_config
from hybrid_video import stream_state
from hybrid_video.checkpoint import config_differences, config_to_json
from hybrid_video.conversion.losses import (make_alignment_loss, make_distill_loss,
                                            make_rollout_loss, rollout_model_config)
from hybrid_video.conversion.surgery import convert, student_model_config, trainable_filter
from hybrid_video.diffusion import flow_matching_loss
from hybrid_video.nn.model import CausalDiT
from tests.helpers import perturbed, rel_err, tiny_model_config

VIDEO = np.random.default_rng(0).uniform(-1, 1, (2, 4, 16, 16, 1)).astype(np.float32)
BATCH = {"video": VIDEO, "labels": np.array([[3], [7]], np.int32)}


def _grads(cfg, seed=0):
  model = perturbed(CausalDiT(cfg, rngs=nnx.Rngs(seed)), seed=seed + 1)
  graphdef, params = nnx.split(model)
  scfg = stage_config()

  def loss(params):
    return flow_matching_loss(nnx.merge(graphdef, params), BATCH, jax.random.key(1), scfg)
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("policy", ["nothing", "dots"])
def test_remat_training_gradients_equal(policy):
  cfg = tiny_model_config(0.5)
  want_loss, want = _grads(cfg)
  cfg.remat, cfg.remat_policy = True, policy
  loss, got = _grads(cfg)
  assert float(loss) == pytest.approx(float(want_loss), rel=1e-6)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("remat", [False, True])
def test_scan_layers_training_gradients_equal(remat):
  """model.scan_layers: runs of consecutive blocks (hybrid 0-2, softmax 3-4) as one lax.scan
  each give the unrolled loss and gradients."""
  cfg = tiny_model_config(layers=(0, 1, 2), num_layers=5)
  cfg.remat = remat
  want_loss, want = _grads(cfg)
  cfg.scan_layers = True
  loss, got = _grads(cfg)
  assert float(loss) == pytest.approx(float(want_loss), rel=1e-6)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert rel_err(a, b) <= 1e-5


def test_remat_stage2_student_with_lora_and_frozen_parameters():
  """The conversion stage-2 loss with a rematerialised student (trainable hybrid + LoRA
  parameters merged with frozen ones): nnx.remat failed here with a TraceContextError."""
  teacher_cfg = tiny_model_config(0.0)
  teacher = perturbed(CausalDiT(teacher_cfg, rngs=nnx.Rngs(0)), seed=1)
  ccfg = convert_config()
  ccfg.hybrid.ratio = 0.5
  results = []
  for remat, scan in ((False, False), (True, False), (True, True)):
    t_cfg = tiny_model_config(0.0)
    t_cfg.remat, t_cfg.scan_layers = remat, scan
    s_cfg = student_model_config(t_cfg, ccfg, lora=True)
    student = convert(teacher, s_cfg, seed=3)
    graphdef, trainable, frozen = nnx.split(student, trainable_filter(2), ...)
    teacher_graphdef, teacher_params = nnx.split(teacher)
    loss_fn = make_distill_loss(graphdef, teacher_graphdef, stage_config(), 2)
    results.append(jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        trainable, frozen, teacher_params, BATCH, jax.random.key(2)))
  (l0, _), g0 = results[0]
  for (l1, _), g1 in results[1:]:
    assert float(l1) == pytest.approx(float(l0), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
      assert rel_err(a, b) <= 1e-5


def test_remat_rollout_stage2_gradients_equal():
  """Stage 2 on rollouts differentiates the streaming step; with model.remat its blocks are
  recomputed in the backward, with the same loss and gradients."""
  teacher = perturbed(CausalDiT(tiny_model_config(0.0), rngs=nnx.Rngs(0)), seed=1)
  ccfg = convert_config()
  ccfg.hybrid.ratio = 0.5
  scfg = ccfg.stage2
  scfg.rollout.num_chunks, scfg.rollout.grad_chunks = 3, 2
  scfg.rollout.sink_chunks, scfg.rollout.window_chunks = 1, 1
  sampler = get_config().sampler
  sampler.kind, sampler.timesteps, sampler.guidance = "few_step", (1000, 500), 1.0
  results = []
  for remat in (False, True):
    t_cfg = tiny_model_config(0.0)
    t_cfg.remat = remat
    s_cfg = rollout_model_config(student_model_config(t_cfg, ccfg, lora=True), scfg.rollout)
    student = convert(teacher, s_cfg, seed=3)
    graphdef, trainable, frozen = nnx.split(student, trainable_filter(2), ...)
    teacher_graphdef, teacher_params = nnx.split(teacher)
    loss_fn = make_rollout_loss(graphdef, teacher_graphdef, sampler, scfg, (2, 2, 16, 16, 1))
    results.append(jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        trainable, frozen, teacher_params, BATCH, jax.random.key(2)))
  (l0, _), g0 = results[0]
  (l1, _), g1 = results[1]
  assert float(l0) > 0 and float(l1) == pytest.approx(float(l0), rel=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    assert rel_err(a, b) <= 1e-5


def test_stage1_alignment_scanned_over_layers():
  """Stage 1's per-layer alignment losses as one lax.scan over the hybrid layers (scan_layers,
  with and without remat) give the unrolled per-layer losses and gradients."""
  teacher = perturbed(CausalDiT(tiny_model_config(0.0), rngs=nnx.Rngs(0)), seed=1)
  ccfg = convert_config()
  ccfg.hybrid.layers = (0, 2, 3)  # not consecutive: one group all the same
  results = []
  for remat, scan in ((False, False), (False, True), (True, True)):
    t_cfg = tiny_model_config(0.0)
    t_cfg.remat, t_cfg.scan_layers = remat, scan
    student = convert(teacher, student_model_config(t_cfg, ccfg, lora=False), seed=3)
    graphdef, trainable, frozen = nnx.split(student, trainable_filter(1), ...)
    teacher_graphdef, teacher_params = nnx.split(teacher)
    loss_fn = make_alignment_loss(graphdef, teacher_graphdef, (0, 2, 3), stage_config(), 2)
    results.append(jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        trainable, frozen, teacher_params, BATCH, jax.random.key(2)))
  (l0, per0), g0 = results[0]
  assert sorted(per0) == ["layer0/align_loss", "layer2/align_loss", "layer3/align_loss"]
  for (l1, per1), g1 in results[1:]:
    assert float(l1) == pytest.approx(float(l0), rel=1e-6)
    for key in per0:
      assert float(per1[key]) == pytest.approx(float(per0[key]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
      assert rel_err(a, b) <= 1e-5


def test_checkpoints_and_streams_from_before_remat_policy_stay_compatible():
  """model.remat_policy is new: a checkpoint or stream saved without it still restores."""
  config = get_config("smoke")
  current = config_to_json(config)
  old = copy.deepcopy(current)
  del old["model"]["remat_policy"]
  assert config_differences(old, current) == []
  config.model.remat_policy = "dots"  # a stream may resume with another policy
  fp = lambda cfg: stream_state.fingerprint(cfg, model_step=1, params="p", batch=1,
                                            frame_hw=(16, 16), num_frames=8)
  assert stream_state.differences(fp(get_config("smoke")), fp(config)) == []
  config.model.dim = 64  # while a field that shapes the frames still counts
  assert stream_state.differences(fp(get_config("smoke")), fp(config))


def test_checkpoints_and_streams_from_before_newer_fields_resume_as_what_they_were():
  """model.prediction, model.null_label, model.label_tokens and sampler.guidance are newer than
  some checkpoints and streams: a saved config without them meant velocity, no null label, one
  token per label, no guidance."""
  fp = lambda cfg: stream_state.fingerprint(cfg, model_step=1, params="p", batch=1,
                                            frame_hw=(16, 16), num_frames=8)
  before = get_config("smoke")
  before.model.prediction, before.model.null_label, before.sampler.guidance = "velocity", False, 1.0
  before.model.label_tokens = 1
  saved_config, saved_stream = config_to_json(before), fp(before)
  for key in ("prediction", "null_label", "label_tokens"):
    del saved_config["model"][key], saved_stream[f"model.{key}"]
  del saved_stream["sampler.guidance"]
  assert config_differences(saved_config, config_to_json(before)) == []
  assert stream_state.differences(saved_stream, fp(before)) == []
  now = get_config("smoke")  # the current tiny recipe differs in all four
  assert config_differences(saved_config, config_to_json(now)) == [
      "model.label_tokens: 1 -> 8", "model.null_label: False -> True",
      "model.prediction: 'velocity' -> 'x0'"]
  assert stream_state.differences(saved_stream, fp(now)) == [
      "model.label_tokens: 1 -> 8", "model.null_label: False -> True",
      "model.prediction: 'velocity' -> 'x0'", "sampler.guidance: 1.0 -> 4.0"]
