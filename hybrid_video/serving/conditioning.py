"""What the page's input means to the model: a digit label, a text prompt, or nothing.

A `Conditioner` turns a validated value (an int label, a prompt string, or None) into the `cond`
that `ChunkRunner.embed` takes for a batch of one: labels int32 [1, 1], embeddings
float32 [1, M, text_dim], or None. Text models need a prompt encoder, a callable
`str -> [M, text_dim]` (the umT5 stack in hybrid_video/text.py, once it is wired to serving);
the worker calls `encode` again when a viewer switches the prompt mid-stream, so the new context
applies from the next chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from hybrid_video.errors import UserError

LABEL, PROMPT, NONE = "label", "prompt", "none"


@dataclass(frozen=True)
class Conditioner:
  """kind: LABEL, PROMPT or NONE (what the page offers); encode: value -> cond for embed."""
  kind: str
  encode: Callable[[Any], Any]
  num_classes: int = 0

  def describe(self) -> dict:
    """What the page needs to draw its input (sent in the hello message)."""
    return {"kind": self.kind, "num_classes": self.num_classes}


def label_conditioner(num_classes: int) -> Conditioner:
  """Digit labels 0..num_classes-1 -> int32 [1, 1]."""
  if num_classes <= 0:
    raise UserError(f"{num_classes=} must be positive for a label-conditioned model")
  return Conditioner(LABEL, lambda label: np.full((1, 1), int(label), np.int32),
                     num_classes=int(num_classes))


def prompt_conditioner(encode_prompt: Callable[[str], Any]) -> Conditioner:
  """Prompt strings -> encode_prompt(prompt) [M, text_dim] -> float32 [1, M, text_dim]."""

  def encode(prompt: str):
    emb = np.asarray(encode_prompt(prompt), np.float32)
    if emb.ndim != 2:
      raise ValueError(f"encode_prompt must return [M, text_dim], got shape {emb.shape}")
    return emb[None]

  return Conditioner(PROMPT, encode)


def no_conditioner() -> Conditioner:
  """Unconditional models: nothing to pick."""
  return Conditioner(NONE, lambda _: None)


def conditioner_for(model_cfg, encode_prompt: Callable[[str], Any] | None = None) -> Conditioner:
  """The conditioner of a model config (model.cond): labels, prompts (needs encode_prompt), none."""
  if model_cfg.cond == "labels":
    return label_conditioner(int(model_cfg.num_classes))
  if model_cfg.cond == "none":
    return no_conditioner()
  if model_cfg.cond == "embeddings":
    if encode_prompt is None:
      raise UserError("model.cond='embeddings' needs a prompt encoder: text prompts are not "
                      "wired into --mode=serve yet (serve a label-conditioned model)")
    return prompt_conditioner(encode_prompt)
  raise UserError(f"model.cond={model_cfg.cond!r} must be one of 'labels', 'none', 'embeddings'")
