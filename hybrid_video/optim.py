"""Learning-rate schedule and optimizer (AdamW with warmup/cosine and gradient clipping)."""

from __future__ import annotations

import jax
import optax


def make_schedule(tcfg) -> optax.Schedule:
  """Linear warmup, then cosine decay to learning_rate * end_lr_factor."""
  warmup = max(int(tcfg.warmup_steps), 0)
  decay_steps = max(int(tcfg.num_steps) - warmup, 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tcfg.learning_rate, warmup_steps=warmup,
      decay_steps=warmup + decay_steps, end_value=tcfg.learning_rate * tcfg.end_lr_factor)


def make_optimizer(tcfg) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with weight decay on matrices only."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(tcfg.grad_clip),
      optax.adamw(make_schedule(tcfg), b1=0.9, b2=0.99, weight_decay=tcfg.weight_decay,
                  mask=decay_mask))
