"""Model surgery for conversion: the student's config, the copy of the teacher's weights into it,
the trainable partitions of each stage, parameter counts, and the export (LoRA merged).

  teacher (all softmax) -> convert(): every teacher parameter copied to the same path; the new
  hybrid parameters keep their initialisation (phi = I, the Gated-DeltaNet gate init, LoRA B = 0)
  -> stage 1 / stage 2 (hybrid_video/conversion/stages.py) -> export_model(): MLP LoRA merged.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections
from flax import nnx, traverse_util

from hybrid_video.config_checks import MEMORY_READS
from hybrid_video.errors import UserError
from hybrid_video.nn.lora import LoRAParam, lora_settings, merge_into
from hybrid_video.nn.model import CausalDiT, abstract_model, resolve_hybrid_layers

# The parameters a hybrid layer adds to the softmax layer it replaces (method doc §3).
NEW_PARAMS = ("phi_q", "phi_k", "phi_v", "w_a", "w_b", "w_gate", "a_log", "dt_bias")
BACKEND_FIELDS = ("attention_impl", "memory_impl", "kernel_interpret", "gdn_chunk_size")
STAGE2_MODES = ("teacher_forcing", "rollout")


# -- configs and parameter partitions --------------------------------------------------------------


def copy_config(cfg) -> ml_collections.ConfigDict:
  """An unlocked deep copy with placeholders resolved (a saved JSON config has the same form)."""
  return ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))


def student_model_config(teacher_cfg, ccfg, *, lora: bool) -> ml_collections.ConfigDict:
  """The student's `model` config: the teacher's, with `convert.hybrid` layers made hybrid, the
  memory read `convert.memory_read` and, for stage 2, the `convert.lora` section (`model.lora`,
  read by blocks.py)."""
  m = copy_config(teacher_cfg)
  if resolve_hybrid_layers(m.num_layers, m.hybrid.layers, m.hybrid.ratio):
    raise UserError("the teacher already has hybrid layers; conversion starts from an all-softmax "
                    "model (train it with --config=configs/default.py:softmax)")
  layers = resolve_hybrid_layers(m.num_layers, ccfg.hybrid.layers, ccfg.hybrid.ratio)
  if not layers:
    raise UserError(f"convert.hybrid selects no layer (ratio={ccfg.hybrid.ratio}, "
                    f"layers={ccfg.hybrid.layers}); nothing to convert")
  m.hybrid.layers = tuple(layers)
  read = str(ccfg.get("memory_read", "block"))
  if read not in MEMORY_READS:
    raise UserError(f"convert.memory_read={read!r} must be one of {MEMORY_READS}")
  m.memory.read = read
  lc = ccfg.lora
  m.lora = ml_collections.ConfigDict({
      "rank": int(lc.rank) if lora else 0, "alpha": float(lc.alpha),
      "mlp": bool(lc.mlp), "memory": bool(lc.memory),
      "init": str(lc.get("init", "peft"))})
  return m


def trainable_filter(stage: int):
  """nnx filter of the parameters that train in `stage` (1: the new hybrid ones; 2: + LoRA)."""
  new = nnx.Any(*(nnx.PathContains(name) for name in NEW_PARAMS))
  return new if stage == 1 else nnx.Any(new, LoRAParam)


def _is_new(path) -> bool:
  return any(k in NEW_PARAMS or (isinstance(k, str) and k.endswith("_lora")) for k in path)


def flatten_state(state) -> dict:
  """{path tuple: array} of an nnx.State, e.g. ("blocks", 0, "self_attn", "q", "kernel")."""
  return traverse_util.flatten_dict(state.to_pure_dict())


def path_name(path) -> str:
  return "/".join(str(k) for k in path)


def _set_flat(model, state, flat: dict) -> None:
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
  nnx.update(model, state)


@dataclasses.dataclass(frozen=True)
class ParamCount:
  total: int
  trainable: int

  @property
  def frozen(self) -> int:
    return self.total - self.trainable

  @property
  def trainable_percent(self) -> float:
    return 100.0 * self.trainable / max(self.total, 1)


def parameter_table(teacher_cfg, ccfg) -> list[tuple[str, ParamCount]]:
  """Counts per stage, from one abstract stage-2 student (nothing is allocated: fine at Wan
  scale). Its parameters are the teacher's, the new hybrid ones, and the LoRA factors."""
  s2 = student_model_config(teacher_cfg, ccfg, lora=True)
  model = abstract_model(s2)
  sizes = {"base": 0, "new": 0, "mlp_lora": 0, "memory_lora": 0}
  for path, x in flatten_state(nnx.state(model, nnx.Param)).items():
    if any(k in ("fc1_lora", "fc2_lora") for k in path):
      kind = "mlp_lora"
    elif any(isinstance(k, str) and k.endswith("_lora") for k in path):
      kind = "memory_lora"
    else:
      kind = "new" if _is_new(path) else "base"
    sizes[kind] += math.prod(x.shape)
  base, new, lora = sizes["base"], sizes["new"], sizes["mlp_lora"] + sizes["memory_lora"]
  return [("teacher", ParamCount(base, 0)),
          ("stage 1 (align)", ParamCount(base + new, new)),
          ("stage 2 (distill)", ParamCount(base + new + lora, new + lora)),
          ("export (merged)", ParamCount(base + new + sizes["memory_lora"], 0))]


def format_table(rows: list[tuple[str, ParamCount]]) -> str:
  lines = [f"{'stage':<20}{'total':>15}{'frozen':>15}{'trainable':>13}{'trainable %':>13}"]
  for name, c in rows:
    lines.append(f"{name:<20}{c.total:>15,}{c.frozen:>15,}{c.trainable:>13,}"
                 f"{c.trainable_percent:>12.3f}%")
  return "\n".join(lines)


def convert(teacher: CausalDiT, student_cfg, seed: int = 0) -> CausalDiT:
  """The student: every teacher parameter copied to the same path (a hybrid layer keeps the
  softmax layer's q, k, v, o and norms); the new parameters keep their initialisation
  (phi = I, the Gated-DeltaNet gate init, LoRA with B = 0)."""
  student = CausalDiT(student_cfg, rngs=nnx.Rngs(seed))
  state = nnx.state(student, nnx.Param)
  s_flat, t_flat = flatten_state(state), flatten_state(nnx.state(teacher, nnx.Param))
  for path, value in t_flat.items():
    if path not in s_flat:
      raise UserError(f"teacher parameter {path_name(path)} has no counterpart in the student")
    if s_flat[path].shape != value.shape:
      raise UserError(f"teacher parameter {path_name(path)} has shape {value.shape}, the "
                      f"student expects {s_flat[path].shape}")
    s_flat[path] = value
  extra = [path_name(p) for p in s_flat if p not in t_flat and not _is_new(p)]
  if extra:
    raise UserError(f"student parameters {extra} are neither the teacher's nor new ones")
  _set_flat(student, state, s_flat)
  return student


def export_model_config(student_cfg) -> ml_collections.ConfigDict:
  """The plain ARL2 model: MLP LoRA merged away; the memory-branch delta stays (see lora.py)."""
  m = copy_config(student_cfg)
  s = lora_settings(m)
  m.lora = ml_collections.ConfigDict({"rank": s.memory_rank, "alpha": s.alpha, "mlp": False,
                                      "memory": bool(s.memory_rank)})
  return m


def export_model(student: CausalDiT, student_cfg):
  """(config, model) of the merged student; its forward equals the student's (fp32 rounding)."""
  plain_cfg = export_model_config(student_cfg)
  graphdef, state = nnx.split(abstract_model(plain_cfg))
  p_flat, s_flat = flatten_state(state), flatten_state(nnx.state(student, nnx.Param))
  for path in p_flat:
    p_flat[path] = s_flat[path]
  dropped = [path_name(p) for p in s_flat
             if p not in p_flat and not any(k in ("fc1_lora", "fc2_lora") for k in p)]
  if dropped:
    raise UserError(f"export would drop student parameters {dropped}")
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(p_flat))
  plain = nnx.merge(graphdef, state)
  for block, plain_block in zip(student.blocks, plain.blocks):
    if block.ffn.fc1_lora is not None:
      merge_into(plain_block.ffn.fc1, block.ffn.fc1_lora)
      merge_into(plain_block.ffn.fc2, block.ffn.fc2_lora)
  return plain_cfg, plain
