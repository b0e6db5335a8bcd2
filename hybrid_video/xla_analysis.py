"""XLA's analyses of compiled executables: per-device memory and FLOPs (with loop trips).

Used by the drivers that report figures without (or besides) running: --mode=compile and
--mode=benchmark.
"""

from __future__ import annotations

import os

from hybrid_video import sharding as sharding_lib
from hybrid_video.flop_count import matmul_flops


def generate_analysis(runner, carry, key, context) -> tuple[dict, dict]:
  """(memory, cost) of a ChunkRunner's generate executable for this carry's shapes: XLA's
  memory and cost analyses, plus `matmul_flops` counted from the traced step with every loop
  trip (hybrid_video/flop_count.py; XLA's `flops` counts a loop body once).

  Traces and compiles on the first call for a shape; the jitted call reuses both.
  """
  with sharding_lib.activation_sharding(runner.mesh, runner.rules):
    traced = runner.generate_jit(carry).trace(runner.state, carry, key, context)
    compiled = traced.lower().compile()
  cost = cost_analysis_dict(compiled)
  cost["matmul_flops"] = matmul_flops(traced.jaxpr)
  return memory_analysis_dict(compiled.memory_analysis()), cost


def cost_analysis_dict(compiled) -> dict[str, float]:
  """flops, transcendentals and bytes accessed that XLA counts for one call ({} if unknown)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every back-end implements it
    return {}
  if isinstance(cost, (list, tuple)):  # older jax: one dict per device
    cost = cost[0] if cost else {}
  return {k.replace(" ", "_"): float(cost[k]) for k in ("flops", "transcendentals",
                                                        "bytes accessed") if k in (cost or {})}


def memory_analysis_dict(stats) -> dict[str, int]:
  """Byte counts of a CompiledMemoryStats; `footprint` = arguments + outputs - aliased + temps,
  the executable's peak of live buffers (parameters, carry, activations)."""
  if stats is None:
    return {}
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
  out = {f.replace("_size_in_bytes", ""): int(getattr(stats, f, 0) or 0) for f in fields}
  out["footprint"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


# XLA:CPU's pass that turns the optimization barriers of jax.checkpoint into plain values
# early, after which CSE merges the recomputation back into the forward pass: a compiled
# training step on CPU then keeps every layer's activations whatever model.remat says. GPU and
# TPU keep the barriers until scheduling. Skipped, CPU honours remat as they do
# (scripts/remat_on_cpu.py: a 4-layer MLP's gradient, 752 MiB of temporaries without remat,
# 752 MiB with remat and the pass, 336 MiB with remat without it).
CPU_REMAT_PASS = "cse_barrier_expander"


def compiler_options(platform: str) -> dict[str, str] | None:
  """Per-executable XLA options for figures that honour remat: on CPU, skip CPU_REMAT_PASS
  (besides any passes XLA_FLAGS already disables); None elsewhere."""
  if platform != "cpu":
    return None
  disabled = [CPU_REMAT_PASS]
  for flag in os.environ.get("XLA_FLAGS", "").split():
    if flag.startswith("--xla_disable_hlo_passes="):
      disabled += [p for p in flag.split("=", 1)[1].split(",") if p and p != CPU_REMAT_PASS]
  return {"xla_disable_hlo_passes": ",".join(disabled)}


def analyse(compiled) -> dict:
  """Per-device memory figures and the FLOP estimate of a compiled executable (the same
  analyses as the benchmark's, `memory_analysis_dict` / `cost_analysis_dict`, with XLA's field
  names)."""
  mem = memory_analysis_dict(compiled.memory_analysis())
  out = {f"{k}_size_in_bytes": v for k, v in mem.items() if k != "footprint"}
  if mem:
    out["total_per_device_bytes"] = mem["footprint"]
  cost = cost_analysis_dict(compiled)
  if "flops" in cost:
    out["flops"] = cost["flops"]
  return out
