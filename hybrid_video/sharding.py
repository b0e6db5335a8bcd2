"""Device mesh, logical-to-mesh rules, and the shardings of parameters, train state and carry.

The mesh has axes (data, fsdp, tensor, context); sizes come from config (-1 fills). Logical
axes (hybrid_video/axes.py) map to mesh axes only through `config.mesh.rules`:

  batch -> (data, fsdp)   embed -> fsdp   heads, mlp -> tensor   tokens, cache_tokens -> context

A dimension whose size the mesh axes do not divide stays replicated, and a mesh axis is used at
most once per array; `tests/golden/param_specs_tiny.json` pins the resulting specs.
Activations are constrained at block boundaries through `constrain`, active only inside
`activation_sharding(mesh, rules)`: that sets the mesh with `jax.set_mesh` (so it is part of
jit's cache key) and the logical-axis rules with flax's `nnx.logical_axis_rules`; `constrain` and
the kernel calls read both through the public getters. Outside it, single-device code paths are
untouched.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from flax.core import spmd
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hybrid_video import axes as ax
from hybrid_video.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor", "context")

DEFAULT_RULES = (
    (ax.BATCH, ("data", "fsdp")),
    (ax.TOKENS, "context"),
    (ax.CACHE_TOKENS, "context"),
    (ax.EMBED, "fsdp"),
    (ax.HEADS, "tensor"),
    (ax.MLP, "tensor"),
    (ax.HEAD_DIM, None),
    (ax.STATE_K, None),
    (ax.STATE_V, None),
    (ax.FRAMES, None),
    (ax.COND, None),
)

# Parameter path (as "blocks/3/self_attn/q/kernel") -> logical axes; first match wins.
_E, _H, _M, _D = ax.EMBED, ax.HEADS, ax.MLP, ax.HEAD_DIM
PARAM_RULES: tuple[tuple[str, tuple], ...] = (
    (r"(self_attn|cross_attn)/(q|k|v)/kernel$", (_E, _H)),
    (r"(self_attn|cross_attn)/(q|k|v)/bias$", (_H,)),
    (r"(self_attn|cross_attn)/norm_(q|k)/scale$", (_H,)),
    (r"(self_attn|cross_attn)/o/kernel$", (_H, _E)),
    (r"(self_attn|cross_attn)/o/bias$", (_E,)),
    (r"self_attn/phi_(q|k|v)$", (_H, _D, None)),
    (r"self_attn/w_(a|b|gate)/kernel$", (_E, _H)),
    (r"self_attn/(a_log|dt_bias)$", (_H,)),
    (r"ffn/fc1/kernel$", (_E, _M)),
    (r"ffn/fc1/bias$", (_M,)),
    (r"ffn/fc2/kernel$", (_M, _E)),
    (r"ffn/fc2/bias$", (_E,)),
    (r"(^|/)(modulation|head_modulation)$", (None, None, _E)),
    (r"norm3/(scale|bias)$", (_E,)),
    (r"patch_embed/proj/kernel$", (None, _E)),
    (r"(patch_embed/proj|time_embed/fc1|cond_embed/fc1)/bias$", (_E,)),
    (r"(time_embed|cond_embed)/fc1/kernel$", (None, _E)),
    (r"(time_embed|cond_embed)/fc2/kernel$", (_E, None)),
    (r"(time_embed|cond_embed)/fc2/bias$", (None,)),
    (r"time_embed/proj/kernel$", (_E, None)),
    (r"time_embed/proj/bias$", (None,)),
    (r"label_to_time/kernel$", (_E, None)),
    (r"label_to_time/bias$", (None,)),
    (r"cond_embed/(table/embedding|null)$", None),
    (r"^head/kernel$", (_E, None)),
    (r"^head/bias$", (None,)),
)


# -- mesh ----------------------------------------------------------------------------------------


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Axis sizes for (data, fsdp, tensor, context); one -1 takes the remaining devices."""
  sizes = [int(mesh_cfg[name]) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise UserError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"mesh axis sizes must be positive or -1, got "
                    f"{dict(zip(MESH_AXES, sizes))}")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise UserError(f"{num_devices} devices cannot fill mesh "
                      f"{dict(zip(MESH_AXES, sizes))}: {num_devices} % {fixed} != 0")
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) > num_devices:
    raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                    f"{num_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[Any] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  if math.prod(shape) < len(devices):
    logging.warning("mesh %s uses %d of %d devices", shape, math.prod(shape), len(devices))
    devices = devices[:math.prod(shape)]
  # Auto axis types: classic jit + NamedSharding + sharding constraints (jax >= 0.7 defaults
  # make_mesh to Explicit).
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def rules_from_config(mesh_cfg) -> dict[str, Any]:
  rules = dict(DEFAULT_RULES)
  for logical, mesh_axes in mesh_cfg.get("rules", None) or ():
    if isinstance(mesh_axes, list):
      mesh_axes = tuple(mesh_axes)
    rules[logical] = mesh_axes
  for logical, mesh_axes in rules.items():
    for a in (mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)):
      if a is not None and a not in MESH_AXES:
        raise UserError(f"mesh rule {logical} -> {a!r}: {a!r} is not a mesh axis {MESH_AXES}")
  return rules


# -- logical -> PartitionSpec ---------------------------------------------------------------------


def logical_to_spec(logical: Sequence[str | None] | None, rules: dict, mesh: Mesh,
                    shape: Sequence[int] | None = None) -> P:
  """PartitionSpec for `logical` axes; undivisible dims and reused mesh axes stay replicated."""
  if logical is None:
    return P()
  used: set[str] = set()
  out = []
  for i, name in enumerate(logical):
    mesh_axes = rules.get(name) if name is not None else None
    if mesh_axes is None:
      out.append(None)
      continue
    mesh_axes = mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)
    mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in mesh_axes)
    if not mesh_axes or (shape is not None and shape[i] % size):
      out.append(None)
      continue
    used.update(mesh_axes)
    out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def _path_str(path) -> str:
  parts = []
  for k in path:
    key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
    parts.append(str(key))
  return "/".join(p for p in parts if p != "value")


def param_logical_axes(path: str, ndim: int):
  for pattern, logical in PARAM_RULES:
    if re.search(pattern, path):
      if logical is not None and len(logical) != ndim:
        raise ValueError(f"sharding rule {pattern!r} gives {len(logical)} axes for {path} "
                         f"with {ndim} dims")
      return logical
  return None  # unknown parameters are replicated (the golden-file test notices new ones)


def param_specs(params, rules: dict, mesh: Mesh):
  """Tree of PartitionSpecs matching `params` (arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: logical_to_spec(param_logical_axes(_path_str(path), x.ndim), rules, mesh,
                                      x.shape), params)


def named(mesh: Mesh, specs):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda s: isinstance(s, P))


def carry_specs(carry, rules: dict, mesh: Mesh):
  """GDN states over (batch, heads); K/V caches over (batch, cache tokens, heads)."""
  def spec(path, x):
    name = _path_str(path).split("/")[-1]
    logical = {"state": ax.GDN_STATE, "k": ax.KV_CACHE, "v": ax.KV_CACHE}.get(name)
    return logical_to_spec(logical, rules, mesh, x.shape)
  return jax.tree_util.tree_map_with_path(spec, carry)


def batch_spec(rules: dict, mesh: Mesh, shape) -> P:
  return logical_to_spec((ax.BATCH,) + (None,) * (len(shape) - 1), rules, mesh, shape)


# -- activation constraints ----------------------------------------------------------------------


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: dict | None = None):
  """Set `mesh` (jax.set_mesh) and the logical-axis `rules` (nnx.logical_axis_rules) for the
  jitted calls made inside: `constrain` and the kernel calls then shard. With mesh None this is a
  no-op, and the model runs unconstrained."""
  if mesh is None:
    yield
    return
  rules = rules or dict(DEFAULT_RULES)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(rules.items())):
    yield


def active() -> tuple[Any, dict] | None:
  """(mesh, rules) set by `activation_sharding`, read through JAX's and flax's public getters;
  None when no mesh is set. The mesh is the abstract mesh while tracing."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return None
  rules = spmd.get_logical_axis_rules()
  return mesh, (dict(rules) if rules else dict(DEFAULT_RULES))


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  current = active()
  if current is None:
    return x
  mesh, rules = current
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, rules, mesh, x.shape))


def describe_specs(specs) -> dict[str, str]:
  """{"blocks/0/self_attn/q/kernel": "PartitionSpec('fsdp', 'tensor')", ...} (golden files)."""
  flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda s: isinstance(s, P))[0]
  return {_path_str(path): str(spec) for path, spec in flat}


# -- host <-> global arrays (one process or several) ------------------------------------------


def put(tree, shardings):
  """Place a tree of host or single-device values (each process holds the full value) onto
  `shardings`. One process: jax.device_put. Several: each process builds only its own shards
  (jax.device_put cannot target devices another process owns)."""
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def one(x, sharding):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = np.asarray(jax.random.key_data(x))
      impl = jax.random.key_impl(x)
      out = jax.make_array_from_callback(data.shape, sharding, lambda idx: data[idx])
      return jax.random.wrap_key_data(out, impl=impl)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)  # already global: a reshard
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])

  return jax.tree.map(one, tree, shardings)


def to_host(x) -> np.ndarray:
  """A (possibly multi-process sharded) array as one numpy array on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def host_to_global(batch: dict, mesh: Mesh, rules: dict) -> dict:
  """This process's slice of a batch -> global arrays sharded over the batch axes."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    global_shape = (v.shape[0] * jax.process_count(), *v.shape[1:])
    sharding = NamedSharding(mesh, batch_spec(rules, mesh, global_shape))
    out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
  return out
