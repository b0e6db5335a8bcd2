"""Training: the pure train step and the one training loop.

  train_step(state, batch, rng) -> (state, metrics)      # pure, jitted, state donated
  run_loop(...)                                          # the loop: deadline, progress bar,
                                                         # NaN stop, log and checkpoint cadence
  Trainer                                                # --mode=train's model + data + loop

The conversion stages (hybrid_video/conversion/stages.py) drive their own step functions through
the same `run_loop`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from hybrid_video import checkpoint as ckpt_lib
from hybrid_video import inputs as inputs_lib
from hybrid_video import sharding as sharding_lib
from hybrid_video.diagnostics import retention_scalars
from hybrid_video.diffusion import (batch_condition, drop_labels, flow_matching_loss,
                                    model_guidance_weight, noisy_inputs, velocity_loss)
from hybrid_video.errors import NonFiniteLossError, UserError
from hybrid_video.metrics import MetricWriter
from hybrid_video.nn.model import CausalDiT
from hybrid_video.optim import make_optimizer, make_schedule
from hybrid_video.train_state import (TrainState, abstract_train_state, apply_gradients,
                                      init_train_state, train_state_specs)

LABEL_DROPOUT_STREAM = 0x1ab  # fold_in tag of the label-dropout key (independent of the noise)


def dropped_labels(batch, rng, rate: float, null_label: int | None):
  """train.label_dropout (diffusion.drop_labels) keyed by its own fold_in of the step's key, so
  the noise of runs without dropout is unchanged; the batch as is at rate 0."""
  if not rate:
    return batch
  return drop_labels(batch, jax.random.fold_in(rng, LABEL_DROPOUT_STREAM), rate, null_label)


def make_train_step(graphdef, tx, tcfg, loss_fn: Callable = flow_matching_loss):
  """Pure `train_step(state, batch, rng) -> (state, metrics)`.

  With train.grad_accum_steps = k > 1 (flow matching only) the batch is split into k
  micro-batches whose gradients are averaged in a lax.scan, so activations are held for one
  micro-batch at a time. The noise is drawn once for the whole batch, so k micro-batches give
  the same update as one step on the whole batch (up to float rounding).
  """
  schedule = make_schedule(tcfg)
  accum = int(tcfg.get("grad_accum_steps", 1) or 1)
  label_dropout = float(tcfg.get("label_dropout", 0.0) or 0.0)

  def train_step(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state["step"])
    null = nnx.merge(graphdef, state["params"]).null_label_index if label_dropout else None
    if null is not None:
      batch = dropped_labels(batch, rng, label_dropout, null)
    if accum == 1:
      def loss_of(params):
        return loss_fn(nnx.merge(graphdef, params), batch, rng, tcfg)
      loss, grads = jax.value_and_grad(loss_of)(state["params"])
    else:
      loss, grads = accumulated_grads(graphdef, state["params"], batch, rng, tcfg, accum)
    return apply_gradients(state, loss, grads, tx, schedule, tcfg.ema_decay)

  return train_step


def accumulated_grads(graphdef, params, batch, rng, tcfg, accum: int):
  """(mean loss, mean gradient) over `accum` equal micro-batches of the flow-matching loss."""
  b = batch["video"].shape[0]
  if b % accum:
    raise UserError(f"train.batch_size={b} (per step) is not divisible by "
                    f"train.grad_accum_steps={accum}")
  frames_per_chunk = nnx.merge(graphdef, params).frames_per_chunk
  noisy = noisy_inputs(batch["video"], rng, frames_per_chunk, tcfg)
  split = lambda x: x.reshape(accum, b // accum, *x.shape[1:])
  micro = (jax.tree.map(split, batch), jax.tree.map(split, noisy))

  def body(carry, mb):
    loss_sum, grad_sum = carry
    mbatch, mnoisy = mb
    loss, grads = jax.value_and_grad(
        lambda p: velocity_loss(nnx.merge(graphdef, p), mbatch, mnoisy,
                                model_guidance_weight(tcfg)))(params)
    return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (loss_sum, grad_sum), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
  return loss_sum / accum, jax.tree.map(lambda g: g / accum, grad_sum)


# -- the loop --------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoopResult:
  start_step: int
  step: int
  first_loss: float = float("nan")
  final_loss: float = float("nan")
  final_metrics: dict = dataclasses.field(default_factory=dict)
  stopped_by_time: bool = False
  seconds: float = 0.0


def run_loop(lcfg, *, name: str, step_fn: Callable[[dict], dict], batches: Iterator[dict],
             start_step: int, checkpointer: ckpt_lib.Checkpointer,
             get_state: Callable[[], TrainState], config, writer: MetricWriter,
             progress: bool = True, nan_hint: str = "",
             extra_scalars: Callable[[int, dict], dict] | None = None,
             on_step: Callable[[int], None] | None = None) -> LoopResult:
  """Run `step_fn(batch) -> metrics` from start_step to lcfg.num_steps or lcfg.max_minutes.

  lcfg: num_steps, max_minutes (<= 0: no bound), log_every, checkpoint_every. Metrics are written
  at the first step, every log_every steps and the last step (plus `extra_scalars(step, batch)`,
  e.g. diagnostics, and frames per second); the state is checkpointed every checkpoint_every
  steps and at the end. A non-finite loss stops the run with a NonFiniteLossError; the last good
  checkpoint is kept.
  """
  num_steps = int(lcfg.num_steps)
  deadline = (time.monotonic() + 60.0 * lcfg.max_minutes) if lcfg.max_minutes > 0 else math.inf
  bar = tqdm(total=num_steps, initial=start_step, desc=name, unit="step",
             disable=not progress or jax.process_index() != 0)
  result = LoopResult(start_step=start_step, step=start_step)
  t0 = t_log = time.perf_counter()
  frames_seen, metrics = 0, {}
  try:
    while result.step < num_steps:
      if time.monotonic() >= deadline:
        result.stopped_by_time = True
        break
      batch = next(batches)
      metrics = step_fn(batch)
      step = result.step = result.step + 1
      loss = result.final_loss = float(metrics["loss"])
      if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"{name}: non-finite loss ({loss}) at step {step}; the last good checkpoint is kept "
            f"(steps {checkpointer.all_steps()}). {nan_hint}".strip())
      if step == start_step + 1:
        result.first_loss = loss
      frames_seen += batch["video"].shape[0] * batch["video"].shape[1]
      bar.update(1)
      bar.set_postfix(loss=f"{loss:.4f}")
      if step % lcfg.log_every == 0 or step == num_steps or step == start_step + 1:
        now = time.perf_counter()
        scalars = {k: float(v) for k, v in metrics.items()}
        scalars["frames_per_second"] = frames_seen / max(now - t_log, 1e-9)
        if extra_scalars is not None:
          scalars.update({k: float(v) for k, v in extra_scalars(step, batch).items()})
        writer.write_scalars(step, scalars)
        result.final_metrics = scalars
        t_log, frames_seen = now, 0
      if step % lcfg.checkpoint_every == 0:
        checkpointer.save(step, get_state(), config)
      if on_step is not None:
        on_step(step)
  finally:
    bar.close()
    writer.close()
    checkpointer.wait()  # a save in flight finishes before any error propagates
  result.final_metrics.update({k: float(v) for k, v in metrics.items()})
  if result.step > start_step and result.step not in checkpointer.all_steps():
    checkpointer.save(result.step, get_state(), config, force=True)
  checkpointer.wait()
  result.seconds = time.perf_counter() - t0
  return result


# -- training from scratch ---------------------------------------------------------------------------


class Trainer:
  """Owns the model, the jitted step, the checkpointer and the metric writer for one workdir."""

  def __init__(self, config, workdir: str):
    self.config = config
    self.workdir = workdir
    self.tcfg = config.train
    if self.tcfg.batch_size < 1:
      raise UserError(f"train.batch_size={self.tcfg.batch_size} must be >= 1")
    if self.tcfg.num_steps < 1:
      raise UserError(f"train.num_steps={self.tcfg.num_steps} must be >= 1")
    self.data = inputs_lib.make_train_inputs(config)
    self.mesh = sharding_lib.make_mesh(config.mesh)
    self.rules = sharding_lib.rules_from_config(config.mesh)
    self.tx = make_optimizer(self.tcfg)
    model_cfg, seed = config.model, int(config.seed)

    def init():
      return init_train_state(CausalDiT(model_cfg, rngs=nnx.Rngs(seed)), self.tx)

    abstract, abstract_state = abstract_train_state(model_cfg, self.tx)
    self.data.check_model(abstract)
    if (self.tcfg.get("label_dropout", 0.0) and model_cfg.cond == "labels"
        and abstract.null_label_index is None):
      raise UserError(f"train.label_dropout={self.tcfg.label_dropout} needs model.null_label=True")
    if model_guidance_weight(self.tcfg) and not self.tcfg.get("label_dropout", 0.0):
      raise UserError(f"train.model_guidance={model_guidance_weight(self.tcfg)} needs "
                      "train.label_dropout > 0: the null label it guides against is trained "
                      "only on dropped labels")
    self.graphdef, _ = nnx.split(abstract)
    self.graphdef_has_hybrid = bool(abstract.hybrid_layers)
    self.state_specs = train_state_specs(abstract_state, self.tx, self.rules, self.mesh)
    self.state_shardings = sharding_lib.named(self.mesh, self.state_specs)
    # Parameters, optimizer state and EMA are born sharded.
    self.state = jax.jit(init, out_shardings=self.state_shardings)()
    replicated = NamedSharding(self.mesh, P())
    self._train_step = jax.jit(
        make_train_step(self.graphdef, self.tx, self.tcfg),
        in_shardings=(self.state_shardings, None, replicated),
        out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
    self.rng = sharding_lib.put(jax.random.key(config.seed + 1), replicated)
    self._retention = jax.jit(self._retention_fn)
    self._last_batch = None
    self.checkpointer = ckpt_lib.Checkpointer(workdir, keep=self.tcfg.keep_checkpoints)

  def step(self, host_batch: dict):
    """One optimizer step on this process's slice of a batch. Returns the metrics."""
    batch = self._last_batch = sharding_lib.host_to_global(host_batch, self.mesh, self.rules)
    with sharding_lib.activation_sharding(self.mesh, self.rules):
      self.state, metrics = self._train_step(self.state, batch, self.rng)
    return metrics

  def _retention_fn(self, params, batch, key):
    model = nnx.merge(self.graphdef, params)
    x0 = batch["video"]
    x_t, t, _ = noisy_inputs(x0, key, model.frames_per_chunk, self.tcfg)
    cond = batch_condition(batch)
    return retention_scalars(model, x0, x_t, t, cond)

  def retention(self, step: int) -> dict:
    """Per hybrid layer and head, the retention exp(sum g) over a chunk on the last batch
    (method doc §8), logged with the metrics."""
    if not self.graphdef_has_hybrid or self._last_batch is None:
      return {}
    with sharding_lib.activation_sharding(self.mesh, self.rules):
      return self._retention(self.state["params"], self._last_batch,
                             jax.random.fold_in(self.rng, step))

  def maybe_restore(self) -> int:
    ck = self.checkpointer
    step = self.tcfg.resume_step if self.tcfg.resume_step is not None else ck.latest_step()
    if step is None:
      return 0
    ck.check_compatible(step, self.config)
    self.state, step = ck.restore(ckpt_lib.abstract_like(self.state), step)
    logging.info("resumed from step %d in %s", step, ck.directory)
    return int(step)

  def model(self, ema: bool = True) -> CausalDiT:
    return nnx.merge(self.graphdef, self.state["ema" if ema else "params"])

  def run(self, *, on_sample: Callable[[int], None] | None = None, progress: bool = True) -> dict:
    """Train until num_steps or max_minutes. Returns a summary dict."""
    tcfg = self.tcfg
    start_step = self.maybe_restore()
    every = int(tcfg.sample_every or 0)
    on_step = None
    if on_sample is not None and every:
      on_step = lambda step: on_sample(step) if step % every == 0 else None
    result = run_loop(
        tcfg, name="training", step_fn=self.step, batches=self.data.iterator(start_step),
        start_step=start_step, checkpointer=self.checkpointer, get_state=lambda: self.state,
        config=self.config, writer=MetricWriter(os.path.join(self.workdir, "metrics")),
        progress=progress, nan_hint="Lower train.learning_rate or check data.", on_step=on_step,
        extra_scalars=lambda step, _: self.retention(step))
    return {"start_step": start_step, "step": result.step, "final_loss": result.final_loss,
            "stopped_by_time": result.stopped_by_time}
