"""The key tables of the Wan2.1 DiT importer: released names -> the project's parameter paths.

Every layout is first normalised to the original Wan names (wan-stack.md §2):
- original Wan (`diffusion_pytorch_model.safetensors`): the names themselves;
- diffusers (`transformer/`): `DIFFUSERS_RENAMES`, applied in order;
- Causal-Forcing / Self-Forcing / ARL2 `.pt`: the state dict under `generator` or
  `generator_ema`, prefixed `model.`, possibly wrapped (`_fsdp_wrapped_module.`,
  `_checkpoint_wrapped_module.`); GAN-trainer modules (`IGNORED_PARTS`) are dropped.

The ARL2 authors' names come from their released inference code, github.com/lky-ang/ARL2 at
commit 3034070 (`wan/modules/hybrid_attention.py` HybridBlockAttention and `utils/lora.py`
LoRALinear; `inference.py` builds the hybrid model before `load_state_dict`, so a checkpoint
holds exactly these module names). Their checkpoints are announced, not released: if a release
names things differently, fix `HYBRID_KEYS` / `MEMORY_LORA_KEYS` / `MLP_LORA_KEYS` here.
  self_attn.phi_{q,k,v}.weight   [H*D, D, 1]  Conv1d(dim, dim, 1, groups=H): y_h = W_h x_h
  self_attn.{a,b,gate}_proj.weight  [H, dim]  nn.Linear(dim, H, bias=False)
  self_attn.A_log, self_attn.dt_bias  [H]
  self_attn.lora_{q,k,v}_A [dim, r], _B [r, dim]   memory-branch LoRA (`enable_gdn_lora`)
  ffn.{0,2}.linear.{weight,bias}, ffn.{0,2}.lora_A [in, r], lora_B [r, out]   FFN LoRALinear

Transforms (source array -> project array; `source_shape` is the inverse on shapes):
  copy     identical
  linear   PyTorch Linear weight [out, in] -> kernel [in, out]
  patch    Conv3d weight [dim, C, pt, ph, pw] -> kernel [pt*ph*pw*C, dim] (PatchEmbed's order)
  phi      grouped Conv1d weight [H*D, D, 1] -> phi [H, D, D] with phi_h = W_h^T (x @ phi_h)
"""

from __future__ import annotations

import re

import numpy as np

from hybrid_video.weights.io import strip_prefixes
from hybrid_video.weights.pread import aligned_empty

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
IGNORED_PARTS = ("_cls_pred_branch", "_register_tokens", "_gan_ca_blocks")

# diffusers -> original Wan (wan-stack.md §2), regex substitutions applied in this order.
DIFFUSERS_RENAMES = (
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.attn1\.to_out\.0\.", ".self_attn.o."),
    (r"\.attn2\.to_out\.0\.", ".cross_attn.o."),
    (r"\.attn1\.to_([qkv])\.", r".self_attn.\1."),
    (r"\.attn2\.to_([qkv])\.", r".cross_attn.\1."),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),
)

# original name -> (project path, transform). Model-wide parameters:
GLOBAL_KEYS = {
    "patch_embedding.weight": (("patch_embed", "proj", "kernel"), "patch"),
    "patch_embedding.bias": (("patch_embed", "proj", "bias"), "copy"),
    "head.modulation": (("head_modulation",), "copy"),
}
for _src, _dst in (("text_embedding.0", ("cond_embed", "fc1")),
                   ("text_embedding.2", ("cond_embed", "fc2")),
                   ("time_embedding.0", ("time_embed", "fc1")),
                   ("time_embedding.2", ("time_embed", "fc2")),
                   ("time_projection.1", ("time_embed", "proj")),
                   ("head.head", ("head",))):
  GLOBAL_KEYS[f"{_src}.weight"] = (_dst + ("kernel",), "linear")
  GLOBAL_KEYS[f"{_src}.bias"] = (_dst + ("bias",), "copy")

# Per block (names after `blocks.N.`, paths after ("blocks", N)): every block has these.
BLOCK_KEYS = {"modulation": (("modulation",), "copy"),
              "norm3.weight": (("norm3", "scale"), "copy"),
              "norm3.bias": (("norm3", "bias"), "copy")}
for _attn in ("self_attn", "cross_attn"):
  for _p in "qkvo":
    BLOCK_KEYS[f"{_attn}.{_p}.weight"] = ((_attn, _p, "kernel"), "linear")
    BLOCK_KEYS[f"{_attn}.{_p}.bias"] = ((_attn, _p, "bias"), "copy")
  for _p in ("norm_q", "norm_k"):
    BLOCK_KEYS[f"{_attn}.{_p}.weight"] = ((_attn, _p, "scale"), "copy")
for _src, _dst in (("ffn.0", "fc1"), ("ffn.2", "fc2")):
  BLOCK_KEYS[f"{_src}.weight"] = (("ffn", _dst, "kernel"), "linear")
  BLOCK_KEYS[f"{_src}.bias"] = (("ffn", _dst, "bias"), "copy")

# The ARL2 hybrid layer's own parameters (all or none per block).
HYBRID_KEYS = {
    "self_attn.phi_q.weight": (("self_attn", "phi_q"), "phi"),
    "self_attn.phi_k.weight": (("self_attn", "phi_k"), "phi"),
    "self_attn.phi_v.weight": (("self_attn", "phi_v"), "phi"),
    "self_attn.a_proj.weight": (("self_attn", "w_a", "kernel"), "linear"),
    "self_attn.b_proj.weight": (("self_attn", "w_b", "kernel"), "linear"),
    "self_attn.gate_proj.weight": (("self_attn", "w_gate", "kernel"), "linear"),
    "self_attn.A_log": (("self_attn", "a_log"), "copy"),
    "self_attn.dt_bias": (("self_attn", "dt_bias"), "copy"),
}
# Memory-branch LoRA: the authors' A [dim, r] and B [r, dim] are the project's orientation.
MEMORY_LORA_KEYS = {f"self_attn.lora_{p}_{f}": (("self_attn", f"mem_{p}_lora", f.lower()), "copy")
                    for p in "qkv" for f in "AB"}
# FFN LoRA (LoRALinear on ffn.0 and ffn.2): A [in, r], B [r, out].
MLP_LORA_KEYS = {f"ffn.{i}.lora_{f}": (("ffn", f"{fc}_lora", f.lower()), "copy")
                 for i, fc in ((0, "fc1"), (2, "fc2")) for f in "AB"}

def normalise(name: str, layout: str) -> str | None:
  """A released key in `layout` -> its original Wan name; None for keys inference ignores."""
  if layout == "pt":
    name = strip_prefixes(name, WRAPPER_PREFIXES)
    if any(part in name for part in IGNORED_PARTS):
      return None
    if name.startswith("model."):
      name = name[len("model."):]
  elif layout == "diffusers":
    for pattern, repl in DIFFUSERS_RENAMES:
      name = re.sub(pattern, repl, name)
  # The authors' LoRALinear wraps ffn.0 / ffn.2: their weights sit one module deeper.
  return re.sub(r"\.ffn\.([02])\.linear\.", r".ffn.\1.", name)


def detect_names(names) -> str | None:
  """The layout a set of key names is written in: "diffusers", "pt", "original", or None."""
  names = list(names)
  if any(n.startswith("condition_embedder.") or ".attn1." in n for n in names):
    return "diffusers"
  if any(n.startswith("model.") for n in names):
    return "pt"
  if any(n.startswith(("patch_embedding.", "time_embedding.", "blocks.")) for n in names):
    return "original"
  return None


def source_shape(transform: str, shape: tuple[int, ...], patch=None) -> tuple[int, ...]:
  """The released tensor shape that `transform` maps onto a project parameter of `shape`;
  patch = ((pt, ph, pw), in_channels) for the "patch" transform."""
  if transform == "linear":
    return (shape[1], shape[0])
  if transform == "phi":
    h, d, _ = shape
    return (h * d, d, 1)
  if transform == "patch":  # [pt*ph*pw*C, dim]; the patch size comes with the channel count
    (pt, ph, pw), c = patch
    return (shape[1], c, pt, ph, pw)
  return tuple(shape)


def transpose(x: np.ndarray, rows: int = 64) -> np.ndarray:
  """x.T of a 2-D array into a 64-byte aligned buffer, a band of rows at a time: ~4x faster than
  numpy's strided `ascontiguousarray(x.T)` on a [8960, 1536] matrix (cache-friendly writes)."""
  out = aligned_empty((x.shape[1], x.shape[0]), x.dtype)
  for i in range(0, x.shape[0], rows):
    out[:, i:i + rows] = x[i:i + rows].T
  return out


def apply_transform(transform: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Source array -> project array of `shape` (C-contiguous, same dtype)."""
  if transform == "linear":
    return transpose(x).reshape(shape)
  if transform == "phi":
    h, d, _ = shape
    x = x.reshape(h, d, d).transpose(0, 2, 1)
  elif transform == "patch":
    x = x.transpose(2, 3, 4, 1, 0)
  return np.ascontiguousarray(x).reshape(shape)
