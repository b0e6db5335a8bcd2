"""Loading Wan2.1 VAE weights into `hybrid_video.nn.vae.VAE`.

Two layouts, detected from the key names (each a plain state dict of 194 tensors at full size):
- original Wan (`Wan2.1_VAE.pth`, or that state dict saved as safetensors): `conv1` / `conv2`
  (the quant / post-quant convs), `{encoder,decoder}.conv1`, `encoder.downsamples.N`,
  `decoder.upsamples.N` (flat lists: residual blocks, then the level's resample),
  `{encoder,decoder}.middle.{0,1,2}` (residual, attention, residual), `.head.{0,2}` (norm, conv);
  inside a residual block `residual.{0,2,3,6}` = norm1, conv1, norm2, conv2, and `shortcut`;
- diffusers `vae/` (`AutoencoderKLWan`, a safetensors file or folder): `quant_conv`,
  `post_quant_conv`, `.conv_in`, `encoder.down_blocks.N` (same flat index as the original),
  `decoder.up_blocks.L.resnets.J` / `.upsamplers.0` (grouped per level: original index
  L * (num_res_blocks + 2) + J, the upsampler at J = num_res_blocks + 1),
  `.mid_block.{resnets.0, attentions.0, resnets.1}`, `.norm_out`, `.conv_out`; inside a residual
  block `norm1, conv1, norm2, conv2, conv_shortcut`.
Both share the leaf names: convs `weight` [out, in, *k] and `bias`, RMS norms `gamma`
[C, 1, 1(, 1)], resamples `resample.1` (the 2-D conv) and `time_conv`.

Conv weights become channels-last kernels [*k, in, out]; gammas become [C]. Keys are checked
(missing / unexpected) and shapes compared before the values are read, values are cast to fp32.
"""

from __future__ import annotations

import dataclasses
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybrid_video.nn.vae import (VAE, Attention, Conv, MidBlock, RMSNorm, ResBlock,
                                 Resample, VAEConfig)
from hybrid_video.weights import io
from hybrid_video.weights.io import WeightsError

WAN, DIFFUSERS = "wan", "diffusers"


@dataclasses.dataclass(frozen=True)
class _Target:
  path: tuple                  # NNX state path, e.g. ("decoder", "up", 4, "conv1", "kernel")
  torch_shape: tuple[int, ...]  # shape in the file


def _conv(names: dict, path: tuple, module: Conv, wan: str, diff: str) -> None:
  k = module.kernel.shape  # [*k, in, out]
  names[WAN][f"{wan}.weight"] = names[DIFFUSERS][f"{diff}.weight"] = _Target(
      (*path, "kernel"), (k[-1], k[-2], *k[:-2]))
  names[WAN][f"{wan}.bias"] = names[DIFFUSERS][f"{diff}.bias"] = _Target(
      (*path, "bias"), (k[-1],))


def _norm(names: dict, path: tuple, module: RMSNorm, wan: str, diff: str, spatial: int) -> None:
  names[WAN][f"{wan}.gamma"] = names[DIFFUSERS][f"{diff}.gamma"] = _Target(
      (*path, "gamma"), (module.gamma.shape[0],) + (1,) * spatial)


def _res(names, path, block: ResBlock, wan: str, diff: str) -> None:
  _norm(names, (*path, "norm1"), block.norm1, f"{wan}.residual.0", f"{diff}.norm1", 3)
  _conv(names, (*path, "conv1"), block.conv1, f"{wan}.residual.2", f"{diff}.conv1")
  _norm(names, (*path, "norm2"), block.norm2, f"{wan}.residual.3", f"{diff}.norm2", 3)
  _conv(names, (*path, "conv2"), block.conv2, f"{wan}.residual.6", f"{diff}.conv2")
  if block.shortcut is not None:
    _conv(names, (*path, "shortcut"), block.shortcut, f"{wan}.shortcut", f"{diff}.conv_shortcut")


def _attn(names, path, attn: Attention, wan: str, diff: str) -> None:
  _norm(names, (*path, "norm"), attn.norm, f"{wan}.norm", f"{diff}.norm", 2)
  _conv(names, (*path, "to_qkv"), attn.to_qkv, f"{wan}.to_qkv", f"{diff}.to_qkv")
  _conv(names, (*path, "proj"), attn.proj, f"{wan}.proj", f"{diff}.proj")


def _resample(names, path, layer: Resample, wan: str, diff: str) -> None:
  _conv(names, (*path, "conv"), layer.conv, f"{wan}.resample.1", f"{diff}.resample.1")
  if layer.time_conv is not None:
    _conv(names, (*path, "time_conv"), layer.time_conv, f"{wan}.time_conv", f"{diff}.time_conv")


def _layer(names, path, layer, wan: str, diff: str) -> None:
  (_res if isinstance(layer, ResBlock) else _resample)(names, path, layer, wan, diff)


def _mid(names, part: str, mid: MidBlock) -> None:
  _res(names, (part, "mid", "res1"), mid.res1, f"{part}.middle.0", f"{part}.mid_block.resnets.0")
  _attn(names, (part, "mid", "attn"), mid.attn, f"{part}.middle.1",
        f"{part}.mid_block.attentions.0")
  _res(names, (part, "mid", "res2"), mid.res2, f"{part}.middle.2", f"{part}.mid_block.resnets.1")


def _ends(names, part: str, module) -> None:
  _conv(names, (part, "conv_in"), module.conv_in, f"{part}.conv1", f"{part}.conv_in")
  _norm(names, (part, "norm_out"), module.norm_out, f"{part}.head.0", f"{part}.norm_out", 3)
  _conv(names, (part, "conv_out"), module.conv_out, f"{part}.head.2", f"{part}.conv_out")


def key_maps(vae: VAE) -> dict[str, dict[str, _Target]]:
  """{layout: {file key: target}} for the (possibly abstract) `vae`."""
  names: dict[str, dict[str, _Target]] = {WAN: {}, DIFFUSERS: {}}
  _conv(names, ("quant_conv",), vae.quant_conv, "conv1", "quant_conv")
  _conv(names, ("post_quant_conv",), vae.post_quant_conv, "conv2", "post_quant_conv")
  enc, dec = vae.encoder, vae.decoder
  _ends(names, "encoder", enc)
  _ends(names, "decoder", dec)
  _mid(names, "encoder", enc.mid)
  _mid(names, "decoder", dec.mid)
  for n, layer in enumerate(enc.down):
    _layer(names, ("encoder", "down", n), layer, f"encoder.downsamples.{n}",
           f"encoder.down_blocks.{n}")
  per_level = vae.config.num_res_blocks + 2
  for n, layer in enumerate(dec.up):
    level, j = divmod(n, per_level)
    diff = (f"decoder.up_blocks.{level}.upsamplers.0" if isinstance(layer, Resample)
            else f"decoder.up_blocks.{level}.resnets.{j}")
    _layer(names, ("decoder", "up", n), layer, f"decoder.upsamples.{n}", diff)
  return names


def _to_kernel(array: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
  """torch [out, in, *k] -> [*k, in, out]; norms and biases are reshaped."""
  if array.ndim >= 3 and len(target_shape) == array.ndim:
    array = np.transpose(array, (*range(2, array.ndim), 1, 0))
  return np.ascontiguousarray(array.reshape(target_shape))


def _file_shapes(path: str):
  """({key: shape}, tensor iterator) for a safetensors file/folder or a torch pickle."""
  if path.endswith(io.TORCH_SUFFIXES):
    state = io.load_torch(path)
    tensors = dict(io.iter_torch_state_dict(state, where=path))
    return {k: tuple(v.shape) for k, v in tensors.items()}, iter(tensors.items())
  shapes = {k: s for k, (s, _) in io.safetensors_shapes(path).items()}
  return shapes, io.iter_safetensors(path)


def detect_layout(keys, maps: dict[str, dict[str, _Target]], where: str) -> str:
  """The layout whose key names the file shares most; an error if it shares none."""
  overlap = {layout: len(set(keys) & set(m)) for layout, m in maps.items()}
  best = max(overlap, key=overlap.get)
  if not overlap[best]:
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise WeightsError(f"{where} is not a Wan VAE checkpoint: none of its keys ({sample}) is a "
                       f"Wan or diffusers AutoencoderKLWan name")
  return best


def read_vae_state(path: str, vae: VAE, layout: str | None = None) -> dict[tuple, np.ndarray]:
  """{NNX path: fp32 array} of `path` for the (possibly abstract) `vae`, all checked."""
  maps = key_maps(vae)
  shapes, tensors = _file_shapes(path)
  if layout is None:
    layout = detect_layout(shapes, maps, path)
  elif layout not in maps:
    raise WeightsError(f"{layout=} must be one of {sorted(maps)}")
  names = maps[layout]
  io.check_keys(set(shapes), set(names), where=f"{path} ({layout} VAE layout)")
  for name, target in names.items():
    io.check_shape(name, shapes[name], target.torch_shape, where=path)
  values = {}
  flat = dict(nnx.to_flat_state(nnx.state(vae, nnx.Param)))
  for name, array in tensors:
    target = names[name]
    values[target.path] = _to_kernel(np.asarray(array, np.float32), flat[target.path].shape)
  return values


def load_vae_weights(vae: VAE, path: str, layout: str | None = None) -> VAE:
  """Overwrite `vae`'s parameters in place with the weights of `path`; returns it."""
  values = read_vae_state(path, vae, layout)
  state = nnx.state(vae, nnx.Param)
  flat = nnx.to_flat_state(state)
  nnx.update(vae, nnx.from_flat_state([(p, v.replace(jnp.asarray(values[p]))) for p, v in flat]))
  return vae


def load_vae(path: str, config: VAEConfig | None = None, dtype=jnp.float32,
             layout: str | None = None) -> VAE:
  """A `VAE(config)` (default: the released sizes) with fp32 weights from `path`.

  `path`: `Wan2.1_VAE.pth` (needs torch), the same state dict as .safetensors, or a diffusers
  `vae/` safetensors file or folder. `dtype` is the compute dtype. The model is built abstractly,
  so no random weights are allocated.
  """
  config = config or VAEConfig()
  abstract = nnx.eval_shape(lambda: VAE(config, rngs=nnx.Rngs(0), dtype=dtype))
  values = read_vae_state(path, abstract, layout)
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  return nnx.merge(graphdef, nnx.from_flat_state(
      [(p, v.replace(jnp.asarray(values[p]))) for p, v in flat]))

