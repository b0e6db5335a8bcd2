"""The train step: gradient accumulation equals one step on the whole batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.default import get_config
from hybrid_video.optim import make_optimizer
from hybrid_video.diffusion import flow_matching_loss
from hybrid_video.train import accumulated_grads, make_train_step
from hybrid_video.train_state import init_train_state
from tests.helpers import rel_err, tiny_model


def _step(model, tcfg, batch):
  tx = make_optimizer(tcfg)
  graphdef, _ = nnx.split(model)
  state = init_train_state(model, tx)
  return jax.jit(make_train_step(graphdef, tx, tcfg))(state, batch, jax.random.key(3))


@pytest.mark.parametrize("accum", [4])  # 4 micro-batches of one clip each
def test_gradient_accumulation_equals_one_step_on_the_whole_batch(accum):
  model = tiny_model(0.5, num_layers=2)  # one hybrid and one softmax layer: four compiles
  tcfg = get_config().train
  tcfg.warmup_steps = 0  # a non-zero learning rate at step 0, so the update shows the gradient
  rng = np.random.default_rng(0)
  batch = {"video": jnp.asarray(rng.uniform(-1, 1, (4, 4, 16, 16, 1)), jnp.float32),
           "labels": jnp.asarray(rng.integers(0, 10, (4, 1)), jnp.int32)}
  whole, m_whole = _step(model, tcfg, batch)
  tcfg.grad_accum_steps = accum
  micro, m_micro = _step(model, tcfg, batch)
  assert abs(float(m_micro["loss"]) - float(m_whole["loss"])) <= 1e-5 * abs(float(m_whole["loss"]))
  assert rel_err(m_micro["grad_norm"], m_whole["grad_norm"]) <= 1e-5
  # Adam's first update is about lr * sign(g): float-rounding differences in tiny gradient
  # entries move a parameter by up to lr, so the parameters agree to 1e-4, the gradients to 1e-5.
  for a, b in zip(jax.tree.leaves(micro["params"]), jax.tree.leaves(whole["params"])):
    assert rel_err(a, b) <= 1e-4
  graphdef, params = nnx.split(model)
  rng = jax.random.key(11)
  loss_w, g_whole = jax.jit(jax.value_and_grad(
      lambda p: flow_matching_loss(nnx.merge(graphdef, p), batch, rng, tcfg)))(params)
  loss_m, g_micro = jax.jit(lambda p: accumulated_grads(graphdef, p, batch, rng, tcfg, accum))(
      params)
  assert abs(float(loss_m) - float(loss_w)) <= 1e-5 * abs(float(loss_w))
  for a, b in zip(jax.tree.leaves(g_micro), jax.tree.leaves(g_whole)):
    assert rel_err(a, b) <= 1e-5
  # The step changed the parameters (the comparison is not between two no-ops).
  assert any(rel_err(a, b) > 1e-4 for a, b in zip(jax.tree.leaves(whole["params"]),
                                                   jax.tree.leaves(nnx.state(model, nnx.Param))))


def test_gradient_accumulation_needs_a_divisible_batch():
  model = tiny_model(0.5)
  tcfg = get_config().train
  tcfg.grad_accum_steps = 3
  batch = {"video": jnp.zeros((4, 4, 16, 16, 1), jnp.float32),
           "labels": jnp.zeros((4, 1), jnp.int32)}
  with pytest.raises(ValueError, match="grad_accum_steps=3"):
    _step(model, tcfg, batch)
