"""Import Wan2.1-T2V-1.3B, Causal-Forcing and ARL2 DiT weights into CausalDiT (issue 13).

  params = load_params(config.model, config.weights, mesh=mesh, rules=rules)   # nnx.State
  directory = import_weights(config, workdir)        # an orbax checkpoint for the other modes

`config.weights` (configs/wan.py):
  path       a file or folder: the original Wan folder (config.json + safetensors), the diffusers
             root or its `transformer/` folder, a Causal-Forcing / ARL2 `.pt`, or that `.pt`
             converted once by scripts/pth_to_safetensors.py
  layout     "auto" (from the key names) | "original" | "diffusers" | "pt"
  pt_key     "generator_ema" | "generator": the entry of a `.pt` dict to read
  dtype      "float32" | "bfloat16": storage of the matrices (`storage_dtype`)
  init_seed  seed of the parameters the file does not carry (conversion's `convert.seed`)

How, in order (nothing is read past the headers until every check has passed):
1. `open_source`: the container (safetensors file / sharded folder, or a torch pickle opened with
   weights_only=True and mmap), its key names and shapes, the layout, and its config.json.
2. `check_config_json` and `make_plan`: every key of the file maps to one project parameter
   (wan_dit_keys.py) or is an ignored GAN-trainer key; no key is missing; every shape matches
   the model config (the error names both shapes). A one-line WeightsError otherwise.
3. Streaming: tensor by tensor, transformed, cast and placed with the parameter's sharding
   (`jax.device_put(array, sharding)`); one host tensor lives at a time, never a second copy of
   the model.
4. Parameters the file does not carry get exactly the values conversion gives them
   (`CausalDiT(cfg, rngs=nnx.Rngs(seed))`, as hybrid_video/conversion/surgery.py `convert`): a
   softmax checkpoint imported into a hybrid config gets phi = I and the Gated-DeltaNet gate
   init, a model with LoRA gets A random and B = 0. Only those parameters are computed: each
   block holding some is rebuilt alone under jit with the model's own keys (`CountingRngs`).
5. FFN LoRA that the file has on a block whose model has no MLP LoRA (the authors' "FFN LoRA on
   all layers" option; the project puts MLP LoRA on hybrid layers only) is merged into the dense
   weights: W + (alpha / r) A B, alpha = model.lora.alpha (the authors' default 32).

Memory: safetensors are read with plain reads into 64-byte aligned buffers (pread.py; a memory
map would keep every touched page in RSS), which `jax.device_put` aliases on the CPU backend, so
the peak is the placed model plus a few tensors (scripts/bench_import.py: 1.06x the 5.68 GB
file). A `.pt` is memory-mapped by torch and its touched pages count in RSS too: convert it once
with scripts/pth_to_safetensors.py where that matters.

The checkpoint `import_weights` writes holds {"step": 0, "params": <the parameters>} (no
optimizer state, no EMA copy) and the config, config.weights included.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from queue import Queue
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from hybrid_video import sharding as sharding_lib
from hybrid_video.checkpoint import Checkpointer
from hybrid_video.nn.lora import lora_settings
from hybrid_video.nn.blocks import Block
from hybrid_video.nn.model import (CausalDiT, CountingRngs, abstract_model, resolve_hybrid_layers,
                                   storage_dtype)
from hybrid_video.weights import io, pread
from hybrid_video.weights.io import WeightsError
from hybrid_video.weights.wan_dit_keys import (BLOCK_KEYS, GLOBAL_KEYS, HYBRID_KEYS,
                                               MEMORY_LORA_KEYS, MLP_LORA_KEYS, apply_transform,
                                               normalise, source_shape)
from hybrid_video.weights.wan_dit_source import Source, check_config_json, open_source

DTYPES = ("float32", "bfloat16")
Path = tuple  # a parameter path, e.g. ("blocks", 0, "self_attn", "q", "kernel")

# -- the plan ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
  path: Path
  transform: str


@dataclasses.dataclass
class Plan:
  entries: dict[str, Entry]                    # file key -> the parameter it fills
  merges: dict[str, tuple[int, str, str]]      # file key -> (block, "fc1"/"fc2", "a"/"b")
  init_paths: list[Path]                       # parameters the file does not carry


def _layer_table(table: dict, i: int) -> dict[str, tuple[Path, str]]:
  return {f"blocks.{i}.{k}": (("blocks", i) + p, t) for k, (p, t) in table.items()}


def make_plan(model_cfg, params: Mapping[Path, Any], source: Source) -> Plan:
  """Map every key of `source` onto `params` ({path: ShapeDtypeStruct}); raise on any
  missing / unexpected key, shape mismatch or hybrid-layer mismatch."""
  found: dict[str, str] = {}  # original name -> file key
  for key in source.shapes:
    name = normalise(key, source.layout)
    if name is None:
      continue
    if name in found:
      raise WeightsError(f"{source.path}: keys {found[name]} and {key} both give {name}")
    found[name] = key
  expected = dict(GLOBAL_KEYS)
  merges, init_paths = {}, []
  groups = {"hybrid": HYBRID_KEYS, "memory LoRA": MEMORY_LORA_KEYS, "MLP LoRA": MLP_LORA_KEYS}
  in_file = {g: [] for g in groups}
  in_model = {g: [] for g in groups}
  for i in range(int(model_cfg.num_layers)):
    expected.update(_layer_table(BLOCK_KEYS, i))
    for group, table in groups.items():
      rows = _layer_table(table, i)
      if any(k in found for k in rows):
        in_file[group].append(i)
      if all(p in params for p, _ in rows.values()):
        in_model[group].append(i)
  # An ARL2 checkpoint must meet the hybrid layers it was trained with; a softmax one may be
  # imported into any hybrid pattern (conversion's starting point).
  if in_file["hybrid"] and in_file["hybrid"] != in_model["hybrid"]:
    raise WeightsError(
        f"{source.path} has ARL2 hybrid layers {in_file['hybrid']} but the model config's are "
        f"{in_model['hybrid']}; set --config.model.hybrid.layers="
        f"'{tuple(in_file['hybrid'])}'")
  extra = sorted(set(in_file["memory LoRA"]) - set(in_model["memory LoRA"]))
  if extra:
    rank = source.shapes[found[f"blocks.{extra[0]}.self_attn.lora_q_A"]][0][-1]
    raise WeightsError(
        f"{source.path} has memory-branch LoRA (rank {rank}) on layers {extra}, which the model "
        f"config lacks; set --config.model.lora.rank={rank} --config.model.lora.memory=True")
  for i in range(int(model_cfg.num_layers)):
    for group, table in groups.items():
      rows = _layer_table(table, i)
      if i in in_model[group] and i in in_file[group]:
        expected.update(rows)
      elif i in in_model[group]:
        init_paths.extend(p for p, _ in rows.values())
      elif i in in_file[group]:  # FFN LoRA on a block without MLP LoRA slots: merged
        for k, (p, _) in rows.items():  # p = ("blocks", i, "ffn", "fc1_lora", "a")
          merges[k] = (i, p[3].replace("_lora", ""), p[4])
  io.check_keys(set(found), set(expected) | set(merges), where=source.path)
  patch = (tuple(model_cfg.patch_size), int(model_cfg.in_channels))
  for name, (path, transform) in expected.items():
    if path not in params:
      raise WeightsError(f"{source.path}: {found[name]} has no parameter {'/'.join(map(str, path))}"
                         f" in the model config")
    want = source_shape(transform, params[path].shape, patch)
    io.check_shape(found[name], source.shapes[found[name]][0], want, where=source.path)
  for name, (i, fc, factor) in merges.items():
    kernel = params[("blocks", i, "ffn", fc, "kernel")].shape
    rank = source.shapes[found[name.replace("_B", "_A")]][0][-1]
    want = (kernel[0], rank) if factor == "a" else (rank, kernel[1])
    io.check_shape(found[name], source.shapes[found[name]][0], want, where=source.path)
  covered = {e[0] for e in expected.values()} | set(init_paths)
  left = sorted("/".join(map(str, p)) for p in params if p not in covered)
  if left:
    raise WeightsError(f"the model config has parameters no Wan checkpoint carries: "
                       f"{', '.join(left[:3])} (Wan needs model.cond='embeddings')")
  return Plan({found[n]: Entry(*v) for n, v in expected.items()},
              {found[n]: v for n, v in merges.items()}, init_paths)


# -- loading -------------------------------------------------------------------------------------


def _flat(tree) -> dict[Path, Any]:
  return traverse_util.flatten_dict(tree.to_pure_dict() if hasattr(tree, "to_pure_dict") else tree)


def param_shardings(abstract_state, mesh=None, rules=None) -> dict[Path, Any]:
  """{path: sharding}: the trainer's parameter shardings on `mesh`, else the first device."""
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {p: device for p in _flat(abstract_state)}
  specs = sharding_lib.param_specs(abstract_state, rules or dict(sharding_lib.DEFAULT_RULES), mesh)
  return {p: jax.sharding.NamedSharding(mesh, s) for p, s in _flat(specs).items()}


def init_new_params(model_cfg, paths, seed: int, block_starts, shardings,
                    dtypes) -> dict[Path, jax.Array]:
  """The values conversion gives `paths` (`CausalDiT(cfg, rngs=nnx.Rngs(seed))`), computed
  alone. They all sit in blocks; each block is rebuilt by itself under jit with the model's keys
  (CountingRngs from block_starts[i], a traced start so one compilation serves every block) and
  only the wanted outputs survive: no full-size initialisation is ever computed."""
  by_block: dict[int, list] = {}
  for path in paths:
    if path[0] != "blocks":
      raise ValueError(f"{path} is not a block parameter")
    by_block.setdefault(path[1], []).append(path[2:])
  hybrid = set(resolve_hybrid_layers(model_cfg.num_layers, model_cfg.hybrid.layers,
                                     model_cfg.hybrid.ratio))
  compiled = {}
  out = {}
  for i, subpaths in sorted(by_block.items()):
    signature = (i in hybrid, tuple(subpaths))
    if signature not in compiled:
      def build(start, is_hybrid=signature[0], subpaths=signature[1]):
        block = Block(model_cfg, is_hybrid, rngs=CountingRngs(seed, start))
        flat = _flat(nnx.state(block, nnx.Param))
        return [flat[sp] for sp in subpaths]
      compiled[signature] = jax.jit(build)
    for sp, value in zip(subpaths, compiled[signature](jnp.uint32(block_starts[i]))):
      path = ("blocks", i) + sp
      out[path] = jax.device_put(value.astype(dtypes[path]), shardings[path])
  return out


def _merge_lora(kernel: jax.Array, a: np.ndarray, b: np.ndarray, scale: float) -> jax.Array:
  delta = scale * np.matmul(a.astype(np.float64), b.astype(np.float64))
  delta = jax.device_put(delta.astype(np.float32), kernel.sharding)
  return jax.jit(lambda k, d: (k.astype(jnp.float32) + d).astype(k.dtype))(kernel, delta)


def _read_ahead(items: Iterator, depth: int = 2) -> Iterator:
  """`items` produced on a thread, up to `depth` ahead: file reads overlap the transposes and
  placement of the previous tensors (both release the GIL). Errors re-raise here."""
  queue: Queue = Queue(maxsize=depth)
  done = object()

  def produce():
    try:
      for item in items:
        queue.put(item)
      queue.put(done)
    except BaseException as e:  # pylint: disable=broad-except  # handed to the consumer
      queue.put(e)

  threading.Thread(target=produce, daemon=True).start()
  while (item := queue.get()) is not done:
    if isinstance(item, BaseException):
      raise item
    yield item


def load_params(model_cfg, wcfg, *, mesh=None, rules=None) -> nnx.State:
  """The model's parameters (an nnx.State of Params) from `wcfg.path`, each placed with its
  sharding on `mesh` (or on the first device)."""
  weights_dtype = wcfg.get("dtype") or "float32"
  if weights_dtype not in DTYPES:
    raise WeightsError(f"weights.dtype={weights_dtype!r} must be one of {DTYPES}")
  if model_cfg.cond != "embeddings":
    raise WeightsError(f"model.cond={model_cfg.cond!r}: Wan weights need model.cond='embeddings' "
                       "(umT5 text embeddings through text_embedding)")
  # CountingRngs also records where each block's keys start (for init_new_params).
  rngs = CountingRngs(int(wcfg.get("init_seed") or 0))
  abstract_state = nnx.state(nnx.eval_shape(lambda: CausalDiT(model_cfg, rngs=rngs)), nnx.Param)
  params = _flat(abstract_state)
  source = open_source(wcfg)
  check_config_json(source, model_cfg)
  plan = make_plan(model_cfg, params, source)
  shardings = param_shardings(abstract_state, mesh, rules)
  dtypes = {p: storage_dtype(p, x.dtype, weights_dtype) for p, x in params.items()}
  placed: dict[Path, jax.Array] = {}
  factors: dict[tuple[int, str, str], np.ndarray] = {}
  for key, array in _read_ahead(source.tensors()):
    if key in plan.entries:
      entry = plan.entries[key]
      host = apply_transform(entry.transform, array, params[entry.path].shape)
      host = pread.aligned(host.astype(dtypes[entry.path], copy=False))  # device_put aliases it
      placed[entry.path] = jax.device_put(host, shardings[entry.path])
    elif key in plan.merges:
      factors[plan.merges[key]] = np.asarray(array, np.float32)
  unread = sorted(k for k, e in plan.entries.items() if e.path not in placed)
  if unread:
    raise WeightsError(f"{source.path}: tensors {unread[:3]} are in the header but could not be "
                       "read")
  if plan.init_paths:
    placed.update(init_new_params(model_cfg, plan.init_paths, int(wcfg.get("init_seed") or 0),
                                  rngs.block_starts, shardings, dtypes))
  alpha = lora_settings(model_cfg).alpha
  for (i, fc, factor), a in sorted(factors.items()):
    if factor == "a":
      path = ("blocks", i, "ffn", fc, "kernel")
      placed[path] = _merge_lora(placed[path], a, factors[(i, fc, "b")], alpha / a.shape[-1])
  nnx.replace_by_pure_dict(abstract_state, traverse_util.unflatten_dict(placed))
  return abstract_state


def load_model(model_cfg, wcfg, *, mesh=None, rules=None) -> CausalDiT:
  """A CausalDiT holding the imported parameters (see load_params)."""
  graphdef, _ = nnx.split(abstract_model(model_cfg))
  return nnx.merge(graphdef, load_params(model_cfg, wcfg, mesh=mesh, rules=rules))


def import_weights(config, workdir: str) -> str:
  """Write <workdir>/checkpoints/0 = {"step": 0, "params": the imported parameters} plus the
  config, from config.weights; nothing is written unless the whole import succeeds.
  Returns the checkpoint directory."""
  directory = os.path.join(workdir, "checkpoints")
  if os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory)):
    raise WeightsError(f"{os.path.abspath(directory)} already holds checkpoints; import into a "
                       "new --workdir")
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.rules_from_config(config.mesh)
  params = load_params(config.model, config.weights, mesh=mesh, rules=rules)
  state = {"step": jnp.zeros((), jnp.int32), "params": params}
  checkpointer = Checkpointer(workdir, keep=1)
  try:
    checkpointer.save(0, state, config, force=True)
    checkpointer.wait()
  finally:
    checkpointer.close()
  return checkpointer.directory
