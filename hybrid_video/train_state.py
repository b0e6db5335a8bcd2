"""The train state and its updates, shared by training from scratch and the conversion stages.

  state = {"step", "params", "opt_state", "ema"}

`params` is whatever tree is trained: the whole model in --mode=train, only the new parameters
in a conversion stage.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from hybrid_video import sharding as sharding_lib
from hybrid_video.nn.model import CausalDiT, ShapeOnlyRngs

TrainState = dict[str, Any]


def init_train_state(params, tx: optax.GradientTransformation) -> TrainState:
  """A fresh state for `params` (a model or a tree of parameters): copies, so the model keeps
  its own buffers when the state is donated."""
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  params = jax.tree.map(jnp.copy, params)
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
  """One optimizer update and the parameters' EMA: (new state, metrics)."""
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


def train_state_specs(abstract_state, tx, rules: dict, mesh):
  """Specs for {"step", "params", "opt_state", "ema"}: optimizer moments follow the params."""
  p_specs = sharding_lib.param_specs(abstract_state["params"], rules, mesh)
  opt_specs = optax.tree_map_params(
      tx, lambda _, spec: spec, abstract_state["opt_state"], p_specs,
      transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P))
  return {"step": P(), "params": p_specs, "opt_state": opt_specs, "ema": p_specs}
