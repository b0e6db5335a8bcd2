"""Training: flow matching through the teacher-forcing forward, AdamW + EMA, orbax, metrics.

  state = {"step", "params", "opt_state", "ema"}
  train_step(state, batch, rng) -> (state, metrics)      # pure, jitted, state donated

The noise level is drawn per chunk (logit-normal); the loss is the MSE between the predicted
velocity and eps - x0 on the noisy half of the teacher-forcing input.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx
from tqdm.auto import tqdm

from jax.sharding import NamedSharding, PartitionSpec as P

from hybrid_video import checkpoint as ckpt_lib
from hybrid_video import inputs as inputs_lib
from hybrid_video import sharding as sharding_lib
from hybrid_video.diffusion import add_noise
from hybrid_video.errors import NonFiniteLossError, UserError
from hybrid_video.metrics import MetricWriter
from hybrid_video.model import CausalDiT, ShapeOnlyRngs

TrainState = dict[str, Any]


def make_schedule(tcfg) -> optax.Schedule:
  """Linear warmup, then cosine decay to learning_rate * end_lr_factor."""
  warmup = max(int(tcfg.warmup_steps), 0)
  decay_steps = max(int(tcfg.num_steps) - warmup, 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tcfg.learning_rate, warmup_steps=warmup,
      decay_steps=warmup + decay_steps, end_value=tcfg.learning_rate * tcfg.end_lr_factor)


def make_optimizer(tcfg) -> optax.GradientTransformation:
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(tcfg.grad_clip),
      optax.adamw(make_schedule(tcfg), b1=0.9, b2=0.99, weight_decay=tcfg.weight_decay,
                  mask=decay_mask))


def sample_chunk_times(key, batch: int, num_chunks: int, tcfg) -> jax.Array:
  """Per-chunk noise levels t [B, N] = sigmoid(N(mean, std))."""
  z = tcfg.t_logit_mean + tcfg.t_logit_std * jax.random.normal(key, (batch, num_chunks))
  return jax.nn.sigmoid(z)


def noisy_inputs(x0, key, frames_per_chunk: int, tcfg):
  """x_t, per-chunk noise levels t [B, N] (the training distribution) and eps, for x0 [B, T, ...]."""
  b, frames = x0.shape[:2]
  k_t, k_eps = jax.random.split(key)
  t = sample_chunk_times(k_t, b, frames // frames_per_chunk, tcfg)
  eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
  return add_noise(x0, eps, jnp.repeat(t, frames_per_chunk, axis=1)), t, eps


def flow_matching_loss(model: CausalDiT, batch, key, tcfg):
  """MSE of the velocity on the noisy half of [clean ; noisy]. batch["video"] [B, T, H, W, C]."""
  x0 = batch["video"]
  x_t, t, eps = noisy_inputs(x0, key, model.frames_per_chunk, tcfg)
  cond = batch["cond"] if "cond" in batch else batch.get("labels")  # embeddings or labels
  pred = model.teacher_forcing(x0, x_t, t, cond)
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - (eps - x0)))


def init_train_state(model: CausalDiT, tx: optax.GradientTransformation) -> TrainState:
  params = nnx.state(model, nnx.Param)
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt_state": tx.init(params),
      "ema": jax.tree.map(jnp.copy, params),
  }


def abstract_train_state(model_cfg, tx: optax.GradientTransformation):
  """(abstract model, abstract TrainState) from one trace: ShapeDtypeStructs only, nothing
  allocated. The model gives the graphdef (`nnx.split`); the state gives shardings and
  restore targets."""
  def build():
    model = CausalDiT(model_cfg, rngs=ShapeOnlyRngs())
    return model, init_train_state(model, tx)
  return nnx.eval_shape(build)


def apply_gradients(state: TrainState, loss, grads, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, ema_decay: float) -> tuple[TrainState, dict]:
  """One optimizer update and the parameters' EMA: (new state, metrics).

  state = {"step", "params", "opt_state", "ema"}, with params whatever tree is trained (the
  whole model here, the new parameters in conversion stages)."""
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  # EMA warmup: early on the average follows the parameters instead of the random init.
  step = state["step"].astype(jnp.float32)
  d = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
  ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["ema"], params)
  metrics = {
      "loss": loss,
      "grad_norm": optax.global_norm(grads),
      "param_norm": optax.global_norm(params),
      "learning_rate": schedule(state["step"]),
  }
  new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "ema": ema}
  return new_state, metrics


def make_train_step(graphdef, tx, tcfg, loss_fn: Callable = flow_matching_loss):
  """Pure `train_step(state, batch, rng) -> (state, metrics)`."""
  schedule = make_schedule(tcfg)

  def train_step(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state["step"])

    def loss_of(params):
      return loss_fn(nnx.merge(graphdef, params), batch, rng, tcfg)

    loss, grads = jax.value_and_grad(loss_of)(state["params"])
    return apply_gradients(state, loss, grads, tx, schedule, tcfg.ema_decay)

  return train_step


def ema_model(graphdef, state: TrainState) -> CausalDiT:
  return nnx.merge(graphdef, state["ema"])


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
    self.graphdef, _ = nnx.split(abstract)
    self.state_specs = sharding_lib.train_state_specs(abstract_state, self.tx, self.rules,
                                                      self.mesh)
    self.state_shardings = sharding_lib.named(self.mesh, self.state_specs)
    # Parameters, optimizer state and EMA are born sharded.
    self.state = jax.jit(init, out_shardings=self.state_shardings)()
    replicated = NamedSharding(self.mesh, P())
    self._train_step = jax.jit(
        make_train_step(self.graphdef, self.tx, self.tcfg),
        in_shardings=(self.state_shardings, None, replicated),
        out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
    self.rng = jax.device_put(jax.random.key(config.seed + 1), replicated)
    self.checkpointer = ckpt_lib.Checkpointer(workdir, keep=self.tcfg.keep_checkpoints)

  def step(self, host_batch: dict):
    """One optimizer step on this process's slice of a batch. Returns the metrics."""
    batch = sharding_lib.host_to_global(host_batch, self.mesh, self.rules)
    with sharding_lib.activation_sharding(self.mesh, self.rules):
      self.state, metrics = self._train_step(self.state, batch, self.rng)
    return metrics

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
    writer = MetricWriter(os.path.join(self.workdir, "metrics"))
    iterator = self.data.iterator(start_step)
    deadline = (time.monotonic() + 60.0 * tcfg.max_minutes) if tcfg.max_minutes > 0 else math.inf
    bar = tqdm(total=tcfg.num_steps, initial=start_step, desc="training", unit="step",
               disable=not progress or jax.process_index() != 0)
    step, last_loss, t_log, frames_seen = start_step, float("nan"), time.perf_counter(), 0
    frames_per_example = None
    stopped_by_time = False
    try:
      while step < tcfg.num_steps:
        if time.monotonic() >= deadline:
          stopped_by_time = True
          break
        batch = next(iterator)
        frames_per_example = batch["video"].shape[1]
        metrics = self.step(batch)
        step += 1
        last_loss = float(metrics["loss"])
        if not math.isfinite(last_loss):
          raise NonFiniteLossError(
              f"non-finite loss ({last_loss}) at step {step}; the last good checkpoint is kept "
              f"(steps {self.checkpointer.all_steps()}). Lower train.learning_rate or check data.")
        frames_seen += batch["video"].shape[0] * frames_per_example
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}")
        if step % tcfg.log_every == 0 or step == tcfg.num_steps:
          now = time.perf_counter()
          scalars = {k: float(v) for k, v in metrics.items()}
          scalars["frames_per_second"] = frames_seen / max(now - t_log, 1e-9)
          writer.write_scalars(step, scalars)
          t_log, frames_seen = now, 0
        if step % tcfg.checkpoint_every == 0:
          self.checkpointer.save(step, self.state, self.config)
        if on_sample is not None and tcfg.sample_every and step % tcfg.sample_every == 0:
          on_sample(step)
    finally:
      bar.close()
      writer.close()
    if step > start_step and step not in self.checkpointer.all_steps():
      self.checkpointer.save(step, self.state, self.config, force=True)
    self.checkpointer.wait()
    return {"start_step": start_step, "step": step, "final_loss": last_loss,
            "stopped_by_time": stopped_by_time}


def train_main(config, workdir: str, *, progress: bool = True) -> dict:
  """--mode=train: train, write periodic samples, then stream the final video (main job)."""
  from hybrid_video import sample as sample_lib  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  trainer = Trainer(config, workdir)
  labels = trainer.data.use_labels

  def on_sample(step):
    path = os.path.join(workdir, "samples", f"step_{step:07d}.mp4")
    sample_lib.write_video(trainer.model(ema=True), config, path,
                           num_frames=config.train.sample_frames, use_labels=labels,
                           progress=False)

  t0 = time.perf_counter()
  summary = trainer.run(on_sample=on_sample, progress=progress)
  summary["train_seconds"] = time.perf_counter() - t0
  logging.info("trained to step %d, final loss %.5f (%.1f s)", summary["step"],
               summary["final_loss"], summary["train_seconds"])
  print(f"trained to step {summary['step']}  final loss {summary['final_loss']:.5f}  "
        f"({summary['train_seconds']:.0f} s)")
  if config.train.final_sample:
    path = os.path.join(workdir, "samples", f"final_step_{summary['step']:07d}.mp4")
    stats = sample_lib.write_video(trainer.model(ema=True), config, path,
                                   num_frames=config.sampler.num_frames, use_labels=labels,
                                   progress=progress)
    summary["video"] = path
    summary["video_stats"] = stats
    sample_lib.report(path, stats, clip_frames=trainer.data.example_shape[0])
  trainer.checkpointer.close()
  return summary
