"""Matmul FLOPs of a traced function, counted from its jaxpr with loop trip counts.

XLA's cost analysis counts a while loop's body once, whatever its trip count, so it misses
the work of a `lax.scan` (the blocked cache attention sweeps a growing number of key blocks;
the chunked GDN scans its sub-chunks). This walks the jaxpr instead:

  dot_general             2 * prod(output shape) * prod(contracted sizes)
  conv_general_dilated    2 * prod(output shape) * prod(kernel window) * in_features / groups
  scan                    body * length
  cond                    the most expensive branch
  while                   body once (the trip count is not static; it is reported as such)
  any other sub-jaxpr     once (pjit, remat, custom_vjp/jvp, shard_map, ...)

Only matrix products (and convolutions, which are matrix products over a window) are counted: they are the work that grows with the history. Pallas
kernels are opaque here (their body would count once per call, not per grid step).
"""

from __future__ import annotations

import math
from typing import Any


def _sub_jaxprs(value: Any):
  """The (closed) jaxprs in one equation parameter."""
  if hasattr(value, "eqns"):
    yield value
  elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def matmul_flops(jaxpr) -> float:
  """Matmul FLOPs of a Jaxpr or ClosedJaxpr (e.g. `jax.make_jaxpr(f)(*args)`)."""
  jaxpr = jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") and hasattr(jaxpr.jaxpr, "eqns") else jaxpr
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      total += 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
    elif name == "conv_general_dilated":
      dn = eqn.params["dimension_numbers"]
      rhs = eqn.invars[1].aval.shape
      out = eqn.outvars[0].aval.shape
      window = math.prod(rhs[d] for d in dn.rhs_spec[2:])
      in_features = rhs[dn.rhs_spec[1]]  # per group already
      total += 2.0 * math.prod(out) * window * in_features
    elif name == "pallas_call":
      continue
    elif name == "cond":
      total += max((matmul_flops(b) for b in _sub_jaxprs(eqn.params["branches"])), default=0.0)
    else:
      inner = sum(matmul_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v))
      total += inner * (eqn.params["length"] if name == "scan" else 1)
  return total
