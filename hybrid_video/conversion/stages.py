"""Conversion stages on the one training loop (`hybrid_video.train.run_loop`), the teacher, and
the export checkpoint.

A stage trains only its trainable partition (surgery.trainable_filter): the student is split into
a trainable and a frozen partition and only the first is updated, so frozen weights stay
bit-identical by construction (masked zero updates would turn -0.0 into +0.0) and cost no
optimizer memory. Each stage checkpoints to <workdir>/<stage name> and resumes from it.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
from absl import logging
from flax import nnx

from hybrid_video import checkpoint as ckpt_lib
from hybrid_video import restore as restore_lib
from hybrid_video.conversion.losses import make_diagnostics_fn, rollout_model_config
from hybrid_video.conversion.surgery import BACKEND_FIELDS, copy_config, trainable_filter
from hybrid_video.errors import CheckpointError, UserError
from hybrid_video.metrics import MetricWriter, read_jsonl
from hybrid_video.nn.model import CausalDiT, abstract_model, stored_params
from hybrid_video.optim import make_optimizer, make_schedule
from hybrid_video.train import dropped_labels, run_loop
from hybrid_video.train_state import apply_gradients, init_train_state

# -- the teacher ----------------------------------------------------------------


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


def stored_teacher(teacher_params, teacher_dtype: str):
  """The frozen teacher's parameters as a stage holds them: an input of the step (no optimizer
  state, no gradient), its matrices in bfloat16 when convert.teacher_dtype says so."""
  if teacher_dtype not in ("float32", "bfloat16"):
    raise UserError(f"convert.teacher_dtype={teacher_dtype!r}: choose float32 or bfloat16")
  return stored_params(teacher_params, teacher_dtype)


# -- stage training --------------------------------------------------------------------------------


def make_stage_step(loss_fn, tx, scfg, null_label: int | None = None):
  """Pure `train_step(state, batch, rng, frozen, teacher) -> (state, metrics)`.

  state = {"step", "params" (trainable only), "opt_state", "ema"}; frozen and teacher
  parameters are read-only inputs. With a null label (the teacher's model.null_label) and
  scfg.label_dropout > 0, that fraction of clips gets the null label, for teacher and student
  alike, so the student learns the teacher's unconditional prediction too (guidance).
  """
  schedule = make_schedule(scfg)
  label_dropout = float(scfg.get("label_dropout", 0.0) or 0.0) if null_label is not None else 0.0

  def train_step(state, batch, rng, frozen, teacher):
    rng = jax.random.fold_in(rng, state["step"])
    batch = dropped_labels(batch, rng, label_dropout, null_label)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], frozen, teacher, batch, rng)
    state, metrics = apply_gradients(state, loss, grads, tx, schedule,
                                               float(scfg.ema_decay))
    return state, {**metrics, **aux}

  return train_step


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


def rollout_teacher_config(teacher_cfg, rcfg):
  """The frozen teacher's model config in rollouts: None (the original, unbounded K/V caches:
  the default, as the method says) or, with rollout.bound_teacher, bounded like the student's."""
  return rollout_model_config(teacher_cfg, rcfg) if rcfg.get("bound_teacher", False) else None


def run_stage(name: str, stage: int, student: CausalDiT, teacher: CausalDiT, scfg, loss_factory,
              data, workdir: str, config, *, progress: bool = True,
              rollout_cfg: ml_collections.ConfigDict | None = None) -> StageResult:
  """Train one stage to scfg.num_steps (or scfg.max_minutes); resumes from <workdir>/<name>.

  rollout_cfg: {"student": model cfg, "teacher": model cfg} for stage 2's rollout mode; the
  student's softmax caches are bounded by convert.stage2.rollout (sink/window), the teacher's
  only when rollout.bound_teacher is set (by default it is the unbounded original, as the
  method says).
  """
  stage_dir = os.path.join(workdir, name)
  layers = student.hybrid_layers
  graphdef, trainable, frozen = nnx.split(student, trainable_filter(stage), ...)
  teacher_graphdef, teacher_params = nnx.split(teacher)
  teacher_params = stored_teacher(teacher_params, config.convert.get("teacher_dtype", "float32"))
  loss_graphdef, loss_teacher_graphdef = graphdef, teacher_graphdef
  if rollout_cfg is not None:  # same parameters, bounded-cache graph
    rcfg = scfg.rollout
    loss_graphdef = nnx.split(abstract_model(rollout_model_config(
        rollout_cfg["student"], rcfg)), trainable_filter(stage), ...)[0]
    teacher_cfg = rollout_teacher_config(rollout_cfg["teacher"], rcfg)
    if teacher_cfg is not None:
      loss_teacher_graphdef = nnx.split(abstract_model(teacher_cfg))[0]
  tx = make_optimizer(scfg)
  state = init_train_state(trainable, tx)
  f = student.frames_per_chunk
  step_fn = jax.jit(make_stage_step(loss_factory(loss_graphdef, loss_teacher_graphdef), tx, scfg,
                                    null_label=student.null_label_index), donate_argnums=(0,))
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
  rng = jax.random.key(int(config.seed) + 100 + stage)
  # Start from settled buffers: XLA:CPU's async dispatch has been seen to hang when a big first
  # executable waits on many pending eager results (jax-ml/jax#25861).
  jax.block_until_ready((state, frozen, teacher_params))
  holder = {"state": state}

  def one_step(batch):
    holder["state"], metrics = step_fn(holder["state"], batch, rng, frozen, teacher_params)
    return metrics

  def diag(step, batch):
    return diag_fn(holder["state"]["params"], frozen, teacher_params, batch,
                   jax.random.fold_in(rng, step))

  try:
    loop = run_loop(scfg, name=name, step_fn=one_step, batches=stage_data.iterator(start),
                    start_step=start, checkpointer=checkpointer,
                    get_state=lambda: holder["state"], config=config,
                    writer=MetricWriter(os.path.join(stage_dir, "metrics")), progress=progress,
                    nan_hint=f"Lower convert.{name}.learning_rate.", extra_scalars=diag)
  finally:
    checkpointer.close()
  result.first_loss, result.final_loss = loop.first_loss, loop.final_loss
  result.final_metrics = loop.final_metrics
  result.trainable, result.steps = holder["state"]["ema"], loop.step
  result.seconds = loop.seconds
  return result


# -- export ----------------------------------------------------------------------------------------


def write_export(workdir: str, model: CausalDiT, model_cfg, config, step: int) -> str:
  """A --mode=train checkpoint (params = EMA = the merged student) in <workdir>/checkpoints."""
  export_config = copy_config(config)
  export_config.model = model_cfg
  state = init_train_state(model, make_optimizer(export_config.train))
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=int(config.train.keep_checkpoints))
  if step in checkpointer.all_steps():  # a rerun: the stages were restored, the export is equal
    logging.warning("export at step %d already in %s: kept", step, checkpointer.directory)
  else:
    checkpointer.save(step, state, export_config, force=True)
  checkpointer.wait()
  checkpointer.close()
  return checkpointer.directory
