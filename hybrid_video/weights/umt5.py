"""Loading umT5-XXL encoder weights into `hybrid_video.nn.umt5.UMT5Encoder`.

Two layouts, detected from the key names (N = 0 .. num_layers - 1):
- original Wan (`models_t5_umt5-xxl-enc-bf16.pth`, or that state dict saved as safetensors):
  `token_embedding.weight`, `blocks.N.{norm1,norm2}.weight`, `blocks.N.attn.{q,k,v,o}.weight`,
  `blocks.N.pos_embedding.embedding.weight`, `blocks.N.ffn.{gate.0,fc1,fc2}.weight`,
  `norm.weight` (242 tensors at full size);
- HF `UMT5EncoderModel` safetensors (a file, or a folder of shards with an index):
  `shared.weight` and/or `encoder.embed_tokens.weight` (tied), `encoder.block.N.layer.0.
  SelfAttention.{q,k,v,o,relative_attention_bias}.weight`, `encoder.block.N.layer.{0,1}.
  layer_norm.weight`, `encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight`,
  `encoder.final_layer_norm.weight`; wi_0 = gate, wi_1 = fc1, wo = fc2.

Linear weights are stored [out, in] and become NNX kernels [in, out]. Tensors are streamed one
at a time into the abstract model's state, cast to the parameter dtype and, with a mesh, placed
straight onto their shards, so the full model is never held unsharded on one device.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from hybrid_video.nn.umt5 import UMT5Config, UMT5Encoder, abstract_encoder, param_shardings
from hybrid_video.weights import io
from hybrid_video.weights.io import WeightsError

WAN, HF = "Wan", "HF"
# HF checkpoints may store the tied token embedding under either (or both) of these names.
_HF_EMBED_ALIASES = ("shared.weight", "encoder.embed_tokens.weight")


@dataclasses.dataclass(frozen=True)
class _Target:
  path: tuple          # NNX state path, e.g. ("blocks", 0, "attn", "q", "kernel")
  transpose: bool      # torch Linear [out, in] -> kernel [in, out]


def _block_names(layout: str, n: int) -> dict[str, _Target]:
  linear = lambda *p: _Target(("blocks", n, *p, "kernel"), True)
  plain = lambda *p: _Target(("blocks", n, *p), False)
  if layout == WAN:
    pre = f"blocks.{n}."
    return {
        pre + "norm1.weight": plain("norm1", "scale"),
        pre + "norm2.weight": plain("norm2", "scale"),
        **{pre + f"attn.{x}.weight": linear("attn", x) for x in "qkvo"},
        pre + "pos_embedding.embedding.weight": plain("pos_embedding"),
        pre + "ffn.gate.0.weight": linear("ffn", "gate"),
        pre + "ffn.fc1.weight": linear("ffn", "fc1"),
        pre + "ffn.fc2.weight": linear("ffn", "fc2"),
    }
  pre = f"encoder.block.{n}.layer."
  return {
      pre + "0.layer_norm.weight": plain("norm1", "scale"),
      pre + "1.layer_norm.weight": plain("norm2", "scale"),
      **{pre + f"0.SelfAttention.{x}.weight": linear("attn", x) for x in "qkvo"},
      pre + "0.SelfAttention.relative_attention_bias.weight": plain("pos_embedding"),
      pre + "1.DenseReluDense.wi_0.weight": linear("ffn", "gate"),
      pre + "1.DenseReluDense.wi_1.weight": linear("ffn", "fc1"),
      pre + "1.DenseReluDense.wo.weight": linear("ffn", "fc2"),
  }


def key_map(layout: str, config: UMT5Config) -> dict[str, _Target]:
  """{file key: target} for `layout` (WAN or HF); for HF the embedding is `shared.weight`."""
  names = {("token_embedding.weight" if layout == WAN else "shared.weight"):
           _Target(("token_embedding",), False)}
  for n in range(config.num_layers):
    names.update(_block_names(layout, n))
  names["norm.weight" if layout == WAN else "encoder.final_layer_norm.weight"] = _Target(
      ("norm", "scale"), False)
  return names


def _iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  if path.endswith(io.TORCH_SUFFIXES):
    yield from io.iter_torch_state_dict(io.load_torch(path), where=path)
  else:
    yield from io.iter_safetensors(path)


def _layout_of(name: str) -> str:
  return HF if name.startswith("encoder.") or name in _HF_EMBED_ALIASES else WAN


def load_umt5_state(path: str, config: UMT5Config, *, mesh: Mesh | None = None,
                    rules: dict | None = None) -> nnx.State:
  """Stream `path` (Wan .pth/.safetensors, or HF safetensors file/folder) into an nnx.State.

  Values are cast to `config.param_dtype`; with `mesh`, each is placed on its NamedSharding from
  `param_shardings(abstract model, mesh, rules)`. Raises WeightsError on missing or unexpected
  keys, shape mismatches and unreadable files.
  """
  abstract = abstract_encoder(config)
  state = nnx.state(abstract)
  flat = dict(nnx.to_flat_state(state))
  shardings = (dict(nnx.to_flat_state(param_shardings(abstract, mesh, rules)))
               if mesh is not None else None)
  dtype = jnp.dtype(config.param_dtype)
  layout, maps, values, found, unexpected = None, {}, {}, set(), []
  for name, array in _iter_tensors(path):
    if name == "encoder.embed_tokens.weight":
      if "shared.weight" in found:
        continue  # the tied copy of an embedding already loaded
      name = "shared.weight"
    layout = layout or _layout_of(name)
    if layout not in maps:
      maps[layout] = key_map(layout, config)
    target = maps[layout].get(name)
    if target is None or name in found:
      unexpected.append(name)
      continue
    found.add(name)
    var = flat[target.path]
    want = tuple(reversed(var.shape)) if target.transpose else tuple(var.shape)
    io.check_shape(name, array.shape, want, where=path)
    array = np.asarray(array).astype(dtype, copy=False)
    array = np.ascontiguousarray(array.T) if target.transpose else array
    values[target.path] = (jax.device_put(array, shardings[target.path]) if shardings
                           else jnp.asarray(array))
  if layout is None:
    raise WeightsError(f"{path} holds no tensors")
  io.check_keys(found | set(unexpected), set(maps[layout]), where=f"{path} ({layout} umT5 layout)")
  return nnx.from_flat_state([(p, v.replace(values[p])) for p, v in flat.items()])


def load_umt5(path: str, config: UMT5Config | None = None, dtype=None, *,
              mesh: Mesh | None = None, rules: dict | None = None) -> UMT5Encoder:
  """The encoder with weights from `path`; `dtype` (e.g. "float32") overrides param_dtype.

  `config` defaults to the released umT5-XXL sizes (bf16). See `load_umt5_state`.
  """
  config = config or UMT5Config()
  if dtype is not None:
    config = dataclasses.replace(config, param_dtype=jnp.dtype(dtype).name)
  graphdef = nnx.graphdef(abstract_encoder(config))
  return nnx.merge(graphdef, load_umt5_state(path, config, mesh=mesh, rules=rules))
