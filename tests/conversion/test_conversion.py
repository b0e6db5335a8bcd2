"""Conversion recipe (hybrid_video/conversion/): the converted student, frozen weights, stage 1 and
2, LoRA merge and export, bounded rollout memory, and the whole --mode=convert job."""

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import convert as convert_config
from configs.default import get_config
from hybrid_video import checkpoint as ckpt_lib
from hybrid_video import diagnostics
from hybrid_video.conversion import losses, stages, surgery
from hybrid_video.modes import convert as convert_mode
from hybrid_video.nn.model import abstract_model
from hybrid_video.optim import make_optimizer
from hybrid_video.train_state import init_train_state
from hybrid_video.nn.embeddings import apply_rope
from hybrid_video.nn.hybrid_attention import HybridAttention
from hybrid_video.nn.model import CausalDiT
from kernels.local_attention.reference import chunk_local_attention_reference
from tests.helpers import jit_call, perturbed, rel_err, tiny_model_config

B, F, HW = 2, 2, 16
TOL = 1e-5


def _config(ratio=0.75):
  config = convert_config.get_config("smoke")
  config.convert.hybrid.ratio = ratio
  for stage in (config.convert.stage1, config.convert.stage2):
    stage.max_minutes = 0  # no wall-clock bound: a busy CI machine must not cut stages short
  return config


@functools.lru_cache(maxsize=None)
def _teacher(num_layers=4, seed=0):
  """A tiny all-softmax teacher (built once per shape: tests only read it)."""
  cfg = tiny_model_config(0.0, num_layers=num_layers)
  return cfg, perturbed(CausalDiT(cfg, rngs=nnx.Rngs(seed)), scale=0.1, seed=seed + 1)


def _student(teacher_cfg, teacher, config, *, lora=False):
  scfg = surgery.student_model_config(teacher_cfg, config.convert, lora=lora)
  return scfg, surgery.convert(teacher, scfg, seed=0)


def _inputs(chunks=4, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  clean = jax.random.uniform(k1, (B, chunks * F, HW, HW, 1), minval=-1, maxval=1)
  t = jax.random.uniform(k3, (B, chunks), minval=0.05, maxval=0.95)
  tf = jnp.repeat(t, F, axis=1)[..., None, None, None]
  noisy = (1 - tf) * clean + tf * jax.random.normal(k2, clean.shape)
  return clean, noisy, t, jnp.array([[3], [7]])


def _flat_params(model):
  return surgery.flatten_state(nnx.state(model, nnx.Param))


def _assert_teacher_weights_unchanged(student, teacher):
  s = _flat_params(student)
  for path, value in _flat_params(teacher).items():
    np.testing.assert_array_equal(np.asarray(s[path]), np.asarray(value),
                                  err_msg=surgery.path_name(path))


def test_converted_student_is_the_teacher_copy():
  teacher_cfg, teacher = _teacher()
  config = _config()
  scfg, student = _student(teacher_cfg, teacher, config)
  assert student.hybrid_layers == (0, 1, 2) and teacher.hybrid_layers == ()
  _assert_teacher_weights_unchanged(student, teacher)  # shared W_q/k/v/o, norms, the rest
  fresh = CausalDiT(scfg, rngs=nnx.Rngs(0))
  for i in student.hybrid_layers:
    attn, init = student.blocks[i].self_attn, fresh.blocks[i].self_attn
    eye = np.broadcast_to(np.eye(attn.head_dim), attn.phi_q.shape)
    for phi in (attn.phi_q, attn.phi_k, attn.phi_v):
      np.testing.assert_array_equal(np.asarray(phi[...]), eye)
    for name in ("a_log", "dt_bias"):  # the Gated DeltaNet initialisation, untouched
      np.testing.assert_array_equal(np.asarray(getattr(attn, name)[...]),
                                    np.asarray(getattr(init, name)[...]))
    np.testing.assert_array_equal(np.asarray(attn.w_gate.kernel[...]),
                                  np.asarray(init.w_gate.kernel[...]))
  a = np.exp(np.asarray(student.blocks[0].self_attn.a_log[...]))
  assert np.all((a > 0) & (a <= 16))
  # The tap that feeds stage 1 runs the teacher's own forward unchanged.
  clean, noisy, t, labels = _inputs()
  record = diagnostics.teacher_attention_io(teacher, (0, 2), clean, noisy, t, labels)
  assert sorted(record) == [0, 2] and record[0]["y_noisy"].shape == (B, 4 * 32, 2, 24)
  out = teacher.teacher_forcing(clean, noisy, t, labels)  # eager, as the tap below: bitwise
  tapped = diagnostics.tapped_teacher_forcing(teacher, {}, clean, noisy, t, labels)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(tapped))
  y = teacher.blocks[0].self_attn.out(record[0]["y_clean"])
  ref, _ = teacher.blocks[0].self_attn.teacher_forcing(
      record[0]["x_clean"], record[0]["x_noisy"], record[0]["angles"], 4)
  assert rel_err(y, ref) <= TOL


def test_student_with_inter_gated_off_equals_local_only_teacher(monkeypatch):
  teacher_cfg, teacher = _teacher()
  _, student = _student(teacher_cfg, teacher, _config())
  clean, noisy, t, labels = _inputs()
  with_memory = jit_call(student, "teacher_forcing", clean, noisy, t, labels)
  monkeypatch.setattr(HybridAttention, "output_gate",
                      lambda self, x: jnp.zeros((*x.shape[:-1], self.num_heads), jnp.float32))
  gated_off = jit_call(student, "teacher_forcing", clean, noisy, t, labels)

  def local_only(attn, xc, xn, angles, num_chunks):  # softmax within the current chunk only
    def one(x):
      q, k, v = attn.project(x)
      q, k = (apply_rope(a, angles) for a in (q, k))
      per_chunk = lambda a: a.reshape(a.shape[0], num_chunks, -1, *a.shape[2:])
      y = chunk_local_attention_reference(per_chunk(q), per_chunk(k), per_chunk(v))
      return attn.out(y.reshape(q.shape))
    return one(xc), one(xn)

  reference = diagnostics.tapped_teacher_forcing(
      teacher, {i: local_only for i in student.hybrid_layers}, clean, noisy, t, labels)
  assert rel_err(gated_off, reference) <= TOL
  assert rel_err(with_memory[:, F:], reference[:, F:]) > 1e-4  # the memory did matter
  assert rel_err(with_memory[:, :F], reference[:, :F]) <= TOL  # chunk 0 has no memory


def test_trainable_fraction_matches_direct_count():
  teacher_cfg, teacher = _teacher()
  config = _config()
  rows = dict(surgery.parameter_table(teacher_cfg, config.convert))
  for stage, lora in ((1, False), (2, True)):
    _, student = _student(teacher_cfg, teacher, config, lora=lora)
    direct = 0
    for i in student.hybrid_layers:
      attn, ffn = student.blocks[i].self_attn, student.blocks[i].ffn
      direct += sum(getattr(attn, n)[...].size for n in ("phi_q", "phi_k", "phi_v", "a_log",
                                                         "dt_bias"))
      direct += sum(getattr(attn, n).kernel[...].size for n in ("w_a", "w_b", "w_gate"))
      if lora:
        for m in (attn.mem_q_lora, attn.mem_k_lora, attn.mem_v_lora, ffn.fc1_lora,
                  ffn.fc2_lora):
          direct += m.a[...].size + m.b[...].size
    total = sum(x.size for x in jax.tree.leaves(nnx.state(student, nnx.Param)))
    row = rows["stage 1 (align)" if stage == 1 else "stage 2 (distill)"]
    assert (row.trainable, row.total) == (direct, total)
    assert row.frozen == rows["teacher"].total
    assert row.trainable_percent == pytest.approx(100 * direct / total)


@pytest.mark.slow
def test_wan_scale_trainable_fraction_is_about_two_percent():
  """Wan2.1-1.3B shapes, 75% hybrid, abstractly: the paper reports about 2% trainable."""
  wan = get_config("wan1_3b").model
  wan.hybrid.ratio = 0.0
  wan_rows = dict(surgery.parameter_table(wan, convert_config.get_config().convert))
  assert 0.8 < wan_rows["stage 1 (align)"].trainable_percent < 1.5
  assert 1.5 < wan_rows["stage 2 (distill)"].trainable_percent < 2.5
  print(surgery.format_table(list(wan_rows.items())))


def _lora_student(teacher_cfg, teacher, config):
  """A student whose LoRA and new parameters are all non-trivial (B != 0)."""
  scfg, student = _student(teacher_cfg, teacher, config, lora=True)
  state = nnx.state(student, surgery.trainable_filter(2))
  keys = iter(jax.random.split(jax.random.key(5), len(jax.tree.leaves(state))))
  nnx.update(student, jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape),
                                   state))
  return scfg, student


def test_lora_merge_equals_the_unmerged_student():
  teacher_cfg, teacher = _teacher()
  config = _config()
  scfg, student = _lora_student(teacher_cfg, teacher, config)
  plain_cfg, plain = surgery.export_model(student, scfg)
  assert plain.blocks[0].ffn.fc1_lora is None and plain.blocks[0].self_attn.mem_q_lora is not None
  clean, noisy, t, labels = _inputs()
  ref = jit_call(student, "teacher_forcing", clean, noisy, t, labels)
  assert rel_err(jit_call(plain, "teacher_forcing", clean, noisy, t, labels), ref) <= TOL
  # Not vacuous: the merged MLP kernels moved, and the memory-branch delta is non-zero.
  ffn, plain_ffn = student.blocks[0].ffn, plain.blocks[0].ffn
  assert rel_err(plain_ffn.fc1.kernel[...], ffn.fc1.kernel[...]) > 1e-3
  assert float(jnp.abs(plain.blocks[0].self_attn.mem_v_lora.delta()).max()) > 1e-3
  # The exported model streams what it teacher-forces (the memory delta is on both paths).
  context = plain.embed_condition(labels, B)
  carry = plain.init_carry(B, (HW, HW), 2)
  _, carry = plain.step(clean[:, :F], jnp.zeros((B,)), context, carry, write=True)
  streamed, _ = plain.step(noisy[:, F:2 * F], t[:, 1], context, carry, write=False)
  assert rel_err(streamed, ref[:, F:2 * F]) <= TOL


@pytest.mark.slow
def test_rollout_stage2_has_constant_peak_memory_in_the_number_of_chunks():
  teacher_cfg, teacher = _teacher(num_layers=2)
  teacher_cfg = surgery.copy_config(teacher_cfg)
  teacher_cfg.gdn_chunk_size = 32  # one GDN sub-chunk per AR chunk: a smaller graph to compile
  config = _config(ratio=0.5)
  config.sampler.timesteps = (1000,)  # one denoising pass per generated chunk: less to compile
  s2c = config.convert.stage2
  s2c.rollout.grad_chunks, s2c.rollout.sink_chunks, s2c.rollout.window_chunks = 2, 1, 2
  scfg, student = _student(teacher_cfg, teacher, config, lora=True)
  batch = {"video": jnp.zeros((1, 4, HW, HW, 1)), "labels": jnp.array([[4]])}
  teacher_params = nnx.state(teacher)
  tx = make_optimizer(s2c)

  def compile_step(num_chunks):
    s2c.rollout.num_chunks = num_chunks
    graphdef = lambda cfg: nnx.split(abstract_model(losses.rollout_model_config(cfg,
                                                                                s2c.rollout)))[0]
    loss = losses.make_rollout_loss(graphdef(scfg), graphdef(teacher_cfg), config.sampler, s2c,
                                (1, F, HW, HW, 1))
    _, trainable, frozen = nnx.split(student, surgery.trainable_filter(2), ...)
    state = init_train_state(trainable, tx)
    step = jax.jit(stages.make_stage_step(loss, tx, s2c), donate_argnums=(0,))
    compiled = step.lower(state, batch, jax.random.key(0), frozen, teacher_params).compile()
    return compiled, state, frozen

  stats = {}
  for n in (4, 8):
    compiled, state, frozen = compile_step(n)
    m = compiled.memory_analysis()
    stats[n] = (m.temp_size_in_bytes, m.argument_size_in_bytes, m.output_size_in_bytes)
  assert stats[4] == stats[8], stats
  for _ in range(2):  # 8 chunks, twice: the student generates its own history each time
    state, metrics = compiled(state, batch, jax.random.key(0), frozen, teacher_params)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
  assert int(state["step"]) == 2
  nnx.update(student, state["params"])
  _assert_teacher_weights_unchanged(student, teacher)


@pytest.mark.slow
def test_convert_mode_end_to_end(tmp_path):
  """Teacher checkpoint -> --mode=convert -> --mode=sample from the export, on tiny Moving Digits
  (F = 1: four chunks per clip). Stage 1 loss falls; frozen weights reach the export unchanged."""
  from hybrid_video.modes.sample import sample_main  # pylint: disable=g-import-not-at-top
  config = _config(ratio=0.5)
  config.data.dir = str(tmp_path / "tfds")
  cc = config.convert
  cc.stage1.num_steps, cc.stage1.log_every, cc.stage1.learning_rate = 30, 10, 1e-2
  cc.stage2.num_steps, cc.stage2.log_every = 3, 3
  cc.sample_frames = 0
  cc.eval.context_frames = 1
  teacher_cfg = tiny_model_config(0.0, num_layers=2, frames_per_chunk=1)
  teacher_cfg.gdn_chunk_size = 16  # one sub-chunk per AR chunk: a smaller graph to compile
  teacher = perturbed(CausalDiT(teacher_cfg, rngs=nnx.Rngs(0)), scale=0.1)
  teacher_config = get_config("softmax")
  teacher_config.model = teacher_cfg
  teacher_config.data = config.data
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "teacher"))
  checkpointer.save(5, init_train_state(teacher, make_optimizer(
      teacher_config.train)), teacher_config, force=True)
  checkpointer.wait()
  checkpointer.close()
  cc.teacher_workdir = str(tmp_path / "teacher")
  workdir = tmp_path / "student"
  config.progress = False
  summary = convert_mode.convert_main(config, str(workdir))

  assert summary["hybrid_layers"] == [0]
  assert summary["stage1"]["steps"] == 30 and summary["stage2"]["steps"] == 3
  logs = {name: [json.loads(line) for line in open(workdir / name / "metrics" / "metrics.jsonl")]
          for name in ("stage1", "stage2")}
  losses = [r["loss"] for r in logs["stage1"]]
  # Single-batch losses are noisy: the mean of the later logged ones must fall well below the first.
  assert sum(losses[1:]) / len(losses[1:]) < 0.8 * losses[0], losses
  for name, stage_logs in logs.items():  # per-layer losses (stage 1) and diagnostics, both stages
    keys = ["rms_intra", "rms_inter", "rms_inter_gated", "inter_intra_ratio", "gate_mean",
            "gate_saturated", "retention_h0", "retention_h1"]
    keys += ["align_loss"] if name == "stage1" else []
    for i in (0,):
      for k in keys:
        assert np.isfinite(stage_logs[-1][f"layer{i}/{k}"]), (name, i, k)
  assert summary["export_rel_err"] <= TOL
  # The export holds the teacher's weights bit for bit, except the hybrid MLPs' merged kernels.
  exported = ckpt_lib.Checkpointer(str(workdir))
  saved = exported.saved_config(exported.latest_step())
  state, _ = exported.restore(jax.eval_shape(lambda: init_train_state(
      CausalDiT(ml_collections.ConfigDict(saved["model"]), rngs=nnx.Rngs(0)),
      make_optimizer(config.train))))
  exported.close()
  export_flat = surgery.flatten_state(state["ema"])
  merged = 0
  for path, value in _flat_params(teacher).items():
    if path[0] == "blocks" and path[1] == 0 and path[2:4] in (("ffn", "fc1"), ("ffn", "fc2")) \
        and path[-1] == "kernel":
      merged += int(np.any(np.asarray(export_flat[path]) != np.asarray(value)))
      continue
    np.testing.assert_array_equal(np.asarray(export_flat[path]), np.asarray(value))
  assert merged == 2  # stage 2 trained the MLP LoRA
  memory_delta_b = np.asarray(export_flat[("blocks", 0, "self_attn", "mem_k_lora", "b")])
  assert float(np.abs(memory_delta_b).max()) > 0
  ev = summary["eval"]
  assert ev["generated_frames"] == 7 and np.isfinite(ev["psnr_student_vs_teacher"])
  assert (workdir / "params.txt").exists()
  sample_config = get_config()
  sample_config.sampler.timesteps = (1000, 500)
  sample_config.sampler.num_frames = 3
  sample_config.progress = False
  stats = sample_main(sample_config, str(workdir))
  assert stats.num_frames == 3


def test_rollout_teacher_is_the_unbounded_original_by_default():
  config = convert_config.get_config("rollout")
  rcfg = config.convert.stage2.rollout
  teacher_cfg = config.model
  assert rcfg.window_chunks > 0                      # the student is bounded ...
  assert stages.rollout_teacher_config(teacher_cfg, rcfg) is None   # ... the teacher is not
  rcfg.bound_teacher = True
  bounded = stages.rollout_teacher_config(teacher_cfg, rcfg)
  assert bounded.kv_cache.window_chunks == rcfg.window_chunks


def test_stage_label_dropout_gives_teacher_and_student_the_null_label():
  """label_dropout=1 with a null label: the loss sees only null labels; without a null label
  (or at rate 0) the batch is untouched."""
  seen = []

  def loss_fn(params, frozen, teacher, batch, rng):
    del frozen, teacher, rng
    jax.debug.callback(lambda x: seen.append(np.asarray(x)), batch["labels"])
    return jnp.sum(params["w"]) * 0.0, {}

  scfg = convert_config.stage_config(label_dropout=1.0)
  tx = make_optimizer(scfg)
  state = init_train_state({"w": jnp.ones(3)}, tx)
  batch = {"video": jnp.zeros((2, 2, 4, 4, 1)), "labels": jnp.array([[3], [7]])}
  for null, want in ((10, [[10], [10]]), (None, [[3], [7]])):
    step = stages.make_stage_step(loss_fn, tx, scfg, null_label=null)
    step(state, batch, jax.random.key(0), None, None)
    jax.effects_barrier()
    np.testing.assert_array_equal(seen[-1], want)
  scfg.label_dropout = 0.0
  stages.make_stage_step(loss_fn, tx, scfg, null_label=10)(state, batch, jax.random.key(0),
                                                            None, None)
  jax.effects_barrier()
  np.testing.assert_array_equal(seen[-1], [[3], [7]])


def test_student_takes_the_memory_read_of_the_convert_config():
  teacher_cfg, _ = _teacher()
  config = _config()
  assert surgery.student_model_config(teacher_cfg, config.convert, lora=False).memory.read == "block"
  config.convert.memory_read = "token"
  student = surgery.student_model_config(teacher_cfg, config.convert, lora=True)
  assert student.memory.read == "token" and student.lora.rank > 0
  config.convert.memory_read = "tokens"
  with pytest.raises(Exception, match="memory_read"):
    surgery.student_model_config(teacher_cfg, config.convert, lora=False)
