"""Kernel calls at the layer boundary: inside `shard_map` when a mesh is active.

Under `sharding.activation_sharding(mesh, rules)` each kernel runs per device on its local
batch and head slice (the kernels never see a sharded array and need no collectives: batch and
heads are independent). Without an active mesh these are the plain `api.py` calls.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax

from hybrid_video import axes as ax
from hybrid_video import sharding as sharding_lib
from kernels.gated_delta import api as gdn_api
from kernels.local_attention import api as attention_api

_B, _H = ax.BATCH, ax.HEADS
# Logical axes of each array argument / output, by rank.
_TOKENS4 = (_B, None, _H, None)          # [B, T, H, D]
_CHUNKS5 = (_B, None, None, _H, None)    # [B, N, L, H, D]
_GATES3 = (_B, None, _H)                 # [B, T, H]
_GATES4 = (_B, None, None, _H)           # [B, N, L, H]
_STATE4 = (_B, _H, None, None)           # [B, H, K, V]
_STATES5 = (_B, None, _H, None, None)    # [B, N, H, K, V]


def _mapped(fn: Callable, array_args: Sequence, in_logical: Sequence, out_logical):
  active = sharding_lib.active()
  if active is None:
    return fn(*array_args)
  mesh, rules = active
  spec = lambda logical, x: sharding_lib.logical_to_spec(logical, rules, mesh, x.shape)
  in_specs = tuple(spec(l, x) for l, x in zip(in_logical, array_args))
  out_shapes = jax.eval_shape(fn, *array_args)
  if isinstance(out_shapes, jax.ShapeDtypeStruct):
    out_specs = spec(out_logical, out_shapes)
  else:  # a tuple of outputs, one logical tuple each
    out_specs = tuple(spec(l, x) for l, x in zip(out_logical, out_shapes))
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)(*array_args)


def arl2_memory(q, k, v, g, beta, *, initial_state=None, **kw):
  """kernels.gated_delta.api.arl2_memory, sharded over batch and heads."""
  args = [q, k, v, g, beta] + ([] if initial_state is None else [initial_state])

  def fn(q, k, v, g, beta, *state):
    return gdn_api.arl2_memory(q, k, v, g, beta, initial_state=state[0] if state else None, **kw)

  in_logical = [_CHUNKS5, _CHUNKS5, _CHUNKS5, _GATES4, _GATES4] + [_STATE4] * bool(
      initial_state is not None)
  return _mapped(fn, args, in_logical, (_CHUNKS5, _STATES5, _STATE4))


def gated_delta_rule(q, k, v, g, beta, *, initial_state=None, **kw):
  """kernels.gated_delta.api.gated_delta_rule, sharded over batch and heads."""
  args = [q, k, v, g, beta] + ([] if initial_state is None else [initial_state])

  def fn(q, k, v, g, beta, *state):
    return gdn_api.gated_delta_rule(q, k, v, g, beta, initial_state=state[0] if state else None,
                                    **kw)

  in_logical = [_TOKENS4] * 3 + [_GATES3] * 2 + [_STATE4] * bool(initial_state is not None)
  return _mapped(fn, args, in_logical, (_TOKENS4, _STATE4))


def chunk_local_attention(q, k, v, **kw):
  fn = functools.partial(attention_api.chunk_local_attention, **kw)
  return _mapped(fn, [q, k, v], [_CHUNKS5] * 3, _CHUNKS5)


def cached_chunk_attention(q, k, v, k_cache, v_cache, cache_valid, **kw):
  """The cache is stored sharded over `cache_tokens`; the kernel sees it whole (gathered)."""
  fn = functools.partial(attention_api.cached_chunk_attention, **kw)
  valid_logical = (None,) * cache_valid.ndim
  return _mapped(fn, [q, k, v, k_cache, v_cache, cache_valid],
                 [_TOKENS4] * 5 + [valid_logical], _TOKENS4)


def teacher_forcing_attention(q_clean, k_clean, v_clean, q_noisy, k_noisy, v_noisy, **kw):
  fn = functools.partial(attention_api.teacher_forcing_attention, **kw)
  return _mapped(fn, [q_clean, k_clean, v_clean, q_noisy, k_noisy, v_noisy], [_TOKENS4] * 6,
                 (_TOKENS4, _TOKENS4))
