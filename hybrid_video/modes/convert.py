"""--mode=convert: a softmax AR teacher into an ARL2 hybrid: the two-stage recipe (method doc §3, §6).

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

The recipe is the library hybrid_video/conversion/ (surgery, losses, stages, evaluation); this
driver runs it and writes the files.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_video import inputs as inputs_lib
from hybrid_video import streaming
from hybrid_video.conversion.evaluation import evaluate
from hybrid_video.conversion.losses import (make_alignment_loss, make_distill_loss,
                                            make_rollout_loss)
from hybrid_video.conversion.stages import load_teacher, run_stage, write_export
from hybrid_video.conversion.surgery import (STAGE2_MODES, convert, copy_config, export_model,
                                             format_table, parameter_table, student_model_config)
from hybrid_video.diffusion import noisy_inputs
from hybrid_video.errors import UserError
from hybrid_video.nn.model import CausalDiT


def _teacher_forcing_check(a: CausalDiT, b: CausalDiT, batch, key, scfg) -> float:
  """Max abs difference / max abs of two models' teacher-forcing outputs on one batch."""
  @nnx.jit
  def rel_err(a, b, batch):
    x0 = batch["video"]
    x_t, t, _ = noisy_inputs(x0, key, a.frames_per_chunk, scfg)
    ya = a.teacher_forcing(x0, x_t, t, batch.get("labels"))
    yb = b.teacher_forcing(x0, x_t, t, batch.get("labels"))
    return jnp.max(jnp.abs(ya - yb)) / jnp.maximum(jnp.max(jnp.abs(ya)), 1e-30)
  return float(rel_err(a, b, batch))


def convert_main(config, workdir: str, *, overrides=None) -> dict:
  """--mode=convert: teacher checkpoint -> stage 1 -> stage 2 -> export -> eval (see module doc)."""
  ccfg = config.convert
  progress = bool(config.progress)
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
      stats = streaming.write_video(model, config, path, frame_hw=inputs_lib.frame_hw(config),
                                    num_frames=int(ccfg.sample_frames), use_labels=use_labels,
                                    progress=progress)
      streaming.report(path, stats)
      summary[f"{name}_video"] = path
  with open(os.path.join(workdir, "summary.json"), "w") as fh:
    json.dump(summary, fh, indent=2)
  return summary
