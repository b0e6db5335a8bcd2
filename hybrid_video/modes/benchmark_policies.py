"""The attention policies the benchmark compares (measured: benchmark.py; predicted at the
paper's shapes: benchmark_predict.py). Same width, depth and tokens per chunk; they differ only
in each layer's attention:
  softmax_full    every layer softmax, full K/V cache
  softmax_window  every layer softmax, cache bounded to sink + window chunks
  arl2_50/75/100  ARL2 with 50/75/100% hybrid layers (earliest first); the remaining softmax
                  layers keep a full K/V cache, as in the authors' released code
"""

from __future__ import annotations

import ml_collections

from hybrid_video.errors import UserError


def _policy(ratio: float, bounded: bool = False):
  return {"ratio": ratio, "bounded": bounded}


POLICIES = {
    "softmax_full": _policy(0.0),
    "softmax_window": _policy(0.0, bounded=True),
    "arl2_50": _policy(0.5),
    "arl2_75": _policy(0.75),
    "arl2_100": _policy(1.0),
}


def policy_model_config(model_cfg, name: str, bcfg) -> ml_collections.ConfigDict:
  """The benchmark backbone with the attention of policy `name`."""
  if name not in POLICIES:
    raise UserError(f"unknown benchmark policy {name!r}; choose from {sorted(POLICIES)}")
  p = POLICIES[name]
  cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  cfg.hybrid.layers = None
  cfg.hybrid.ratio = p["ratio"]
  cfg.kv_cache.sink_chunks = int(bcfg.sink_chunks) if p["bounded"] else 0
  cfg.kv_cache.window_chunks = int(bcfg.window_chunks) if p["bounded"] else 0
  return cfg
