"""Limits and the parsing of every client message; a bad one raises RequestError, shown on the page.

Client -> server messages are JSON objects with a "type":

  {"type": "start", "label": 3 | "prompt": "...", "seed": 0, "frames": 64 | "seconds": 8.0}
  {"type": "condition", "label": 5 | "prompt": "..."}   # applies from the next chunk
  {"type": "stop"}    {"type": "save"}

Only these keys are accepted, so no message can name a file; the server picks every path.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from hybrid_video.errors import UserError
from hybrid_video.serving.conditioning import LABEL, NONE, PROMPT, Conditioner

MAX_SEED = 2**31 - 1
MAX_MESSAGE_CHARS = 4096  # a start message with the longest prompt fits many times over
_COND_KEY = {LABEL: "label", PROMPT: "prompt", NONE: None}
_KEYS = {"start": {"type", "label", "prompt", "seed", "frames", "seconds"},
         "condition": {"type", "label", "prompt"}, "stop": {"type"}, "save": {"type"}}


class RequestError(UserError):
  """A client message that cannot be served; its text goes back to the page."""


@dataclass(frozen=True)
class Limits:
  """Bounds on one request (from config.serve)."""
  max_frames: int
  max_prompt_chars: int
  fps: float  # turns a length in seconds into frames

  @classmethod
  def from_config(cls, scfg) -> Limits:
    limits = cls(int(scfg.max_frames), int(scfg.max_prompt_chars), float(scfg.fps))
    if limits.max_frames <= 0 or limits.fps <= 0 or limits.max_prompt_chars <= 0:
      raise UserError(f"serve.max_frames={limits.max_frames}, serve.fps={limits.fps} and "
                      f"serve.max_prompt_chars={limits.max_prompt_chars} must be positive")
    return limits


@dataclass(frozen=True)
class StartRequest:
  """A validated start: cond is an int label, a prompt string or None."""
  cond: Any
  seed: int
  num_frames: int


def parse_message(text: Any) -> dict:
  """A client's raw WebSocket text -> a JSON object with a known "type" and only known keys."""
  if not isinstance(text, str):
    raise RequestError("messages must be JSON text, not binary")
  if len(text) > MAX_MESSAGE_CHARS:
    raise RequestError(f"message of {len(text)} characters must be at most {MAX_MESSAGE_CHARS}")
  try:
    msg = json.loads(text)
  except ValueError:
    raise RequestError("messages must be JSON objects") from None
  if not isinstance(msg, dict):
    raise RequestError("messages must be JSON objects")
  kind = msg.get("type")
  if kind not in _KEYS:
    raise RequestError(f"type={kind!r} must be one of {', '.join(sorted(_KEYS))}")
  unknown = sorted(set(msg) - _KEYS[kind])
  if unknown:
    raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))} in a {kind!r} message")
  return msg


def _integer(msg: dict, name: str, lo: int, hi: int) -> int:
  v = msg.get(name)
  if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
    raise RequestError(f"{name}={v!r} must be an integer in [{lo}, {hi}]")
  return v


def parse_condition_value(msg: dict, conditioner: Conditioner, limits: Limits):
  """The label (int), prompt (str) or None a message carries, checked for this model."""
  key = _COND_KEY[conditioner.kind]
  other = {"label", "prompt"} - {key}
  given = sorted(k for k in other if k in msg)
  if given:
    raise RequestError(f"this model takes {key or 'no conditioning'}, not {given[0]!r}")
  if conditioner.kind == LABEL:
    return _integer(msg, "label", 0, conditioner.num_classes - 1)
  if conditioner.kind == PROMPT:
    prompt = msg.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
      raise RequestError(f"prompt={prompt!r} must be a non-empty string")
    if len(prompt) > limits.max_prompt_chars:
      raise RequestError(f"prompt of {len(prompt)} characters must be at most "
                         f"{limits.max_prompt_chars}")
    if not prompt.isprintable():
      raise RequestError("prompt must not contain control characters")
    return prompt
  return None


def parse_start(msg: dict, conditioner: Conditioner, limits: Limits) -> StartRequest:
  """A "start" message -> StartRequest (exactly one of frames / seconds)."""
  cond = parse_condition_value(msg, conditioner, limits)
  seed = _integer(msg, "seed", 0, MAX_SEED)
  if ("frames" in msg) == ("seconds" in msg):
    raise RequestError("give the length as exactly one of frames or seconds")
  if "frames" in msg:
    num_frames = _integer(msg, "frames", 1, limits.max_frames)
  else:
    seconds = msg["seconds"]
    longest = limits.max_frames / limits.fps
    if (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
        or not math.isfinite(seconds) or not 0 < seconds <= longest):
      raise RequestError(f"seconds={seconds!r} must be a number in (0, {longest:g}] "
                         f"({limits.max_frames} frames at {limits.fps:g} fps)")
    num_frames = max(1, min(limits.max_frames, round(seconds * limits.fps)))
  return StartRequest(cond, seed, num_frames)
