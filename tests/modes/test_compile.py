"""--mode=compile for the conversion stages and the VAE decode step (train and sampler steps:
tests/test_sharding.py), the verdict line, and the frozen teacher's bf16 storage."""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest
from flax import nnx

from configs import convert, default, wan
from hybrid_video.conversion.stages import stored_teacher
from hybrid_video.errors import UserError
from hybrid_video.modes.compile import compile_main, compile_steps, verdict
from hybrid_video import sharding as sharding_lib
from hybrid_video.xla_analysis import CPU_REMAT_PASS, compiler_options
from hybrid_video.nn.model import CausalDiT, count_params
from tests.helpers import tiny_model_config


def test_verdict_line():
  assert verdict(40 * 2**30, 80.0) == "fits: 40.00 GiB of 80 GiB per device (50%)"
  assert verdict(81 * 2**30, 80.0).startswith("DOES NOT FIT: 81.00 GiB")


def test_stored_teacher_keeps_norms_and_modulation_in_float32():
  model = CausalDiT(tiny_model_config(0.0), rngs=nnx.Rngs(0))
  _, params = nnx.split(model)
  stored = stored_teacher(params, "bfloat16")
  flat = dict(nnx.to_flat_state(stored))
  kinds = collections.Counter((p[-1], str(v.get_value().dtype)) for p, v in flat.items())
  assert kinds[("kernel", "bfloat16")] > 0 and ("bias", "bfloat16") not in kinds
  assert all(str(v.get_value().dtype) == "float32"
             for p, v in flat.items() if p[0] == "time_embed")
  for (p, a), (_, b) in zip(nnx.to_flat_state(params), nnx.to_flat_state(stored)):
    np.testing.assert_allclose(np.asarray(b.get_value(), np.float32), np.asarray(a.get_value()), rtol=1e-2,
                               atol=1e-6)
  assert stored_teacher(params, "float32") is not None
  with pytest.raises(UserError, match="teacher_dtype"):
    stored_teacher(params, "float16")


def _convert_config(**convert_fields):
  c = convert.get_config("smoke")
  c.model.num_layers = 2
  c.convert.hybrid.layers = (0,)
  c.mesh.data, c.mesh.fsdp = 2, 4
  c.train.batch_size = 8
  for k, v in convert_fields.items():
    c.convert[k] = v
  return c


@pytest.mark.slow
def test_compile_reports_every_conversion_step(capsys):
  c = _convert_config(teacher_dtype="bfloat16")
  c.compile.steps = ("stage1", "stage2_tf", "stage2_rollout")
  c.compile.device_memory_gib = 1e-6  # nothing fits: the verdict must say so
  results = compile_main(c, None)
  out = capsys.readouterr().out
  for name in c.compile.steps:
    stats = results[name]
    assert stats["temp_size_in_bytes"] > 0 and stats["matmul_flops"] > 0
    assert stats["hybrid_layers"] == [0] and stats["teacher_dtype"] == "bfloat16"
    assert stats["verdict"].startswith("DOES NOT FIT")
    assert f"{name}  " in out
  # stage 1 trains the new hybrid parameters only; stage 2 adds the LoRA factors
  assert 0 < results["stage1"]["trainable_params"] < results["stage2_tf"]["trainable_params"]
  # rollouts generate chunks: several times the teacher-forcing step's matmul work
  assert results["stage2_rollout"]["matmul_flops"] > results["stage2_tf"]["matmul_flops"]


@pytest.mark.slow
def test_bf16_teacher_halves_its_argument_bytes():
  """A bf16 teacher shrinks the step's arguments (the teacher is an argument; nothing else
  changes)."""
  def arguments(dtype):
    c = _convert_config(teacher_dtype=dtype)
    c.compile.steps = ("stage2_tf",)
    return compile_main(c, None)["stage2_tf"]["argument_size_in_bytes"]
  teacher_cfg = _convert_config().model
  teacher = nnx.eval_shape(lambda: CausalDiT(teacher_cfg, rngs=nnx.Rngs(0)))
  _, params = nnx.split(teacher)
  saved = sum(x.size * 2 for x in jax.tree.leaves(stored_teacher(params, "bfloat16"))
              if x.dtype == "bfloat16")  # bytes saved in all, over the 8 devices
  got = arguments("float32") - arguments("bfloat16")
  assert 0 < got <= saved and got >= saved / 8 * 0.9  # each device saves its shard (or more)


def test_compile_step_errors():
  c = wan.get_config("tiny")
  c.compile.steps = ("stage1",)
  with pytest.raises(UserError, match="needs a config with a `convert` section"):
    compile_main(c, None)
  c.compile.steps = ("nope",)
  with pytest.raises(UserError, match="choose from"):
    compile_main(c, None)
  c = convert.get_config("smoke")
  c.compile.steps = ("vae_decode",)
  with pytest.raises(UserError, match="needs a Wan config"):
    compile_main(c, None)


@pytest.mark.slow
def test_compile_vae_decode_step():
  c = wan.get_config("tiny")
  c.compile.steps = ("vae_decode",)
  c.mesh.fsdp = -1
  results = compile_main(c, None)["vae_decode"]
  assert results["latents_shape"] == [1, 3, 8, 8, 16]
  assert results["temp_size_in_bytes"] > 0 and results["matmul_flops"] > 1e9  # convolutions
  assert results["verdict"].startswith("fits")


@pytest.mark.slow
def test_compiled_train_step_honours_remat_on_cpu(monkeypatch):
  """The train step's compiled temporaries shrink with model.remat, on CPU too: compile mode
  skips XLA:CPU's pass that merged the recomputation back into the forward (with it, remat or
  not gave the same figure: 87 MiB here either way, 31 MiB with remat now)."""
  c = default.get_config("softmax")
  c.model.num_layers, c.model.dim, c.model.num_heads, c.model.mlp_dim = 4, 64, 2, 1024
  c.train.batch_size = 8
  c.compile.clip_chunks = 2
  mesh = sharding_lib.make_mesh(c.mesh)
  rules = sharding_lib.rules_from_config(c.mesh)

  def temporaries(remat):
    c.model.remat = remat
    return compile_steps(c, mesh, rules, ("train",), echo=False)["train"]["temp_size_in_bytes"]
  plain, remat = temporaries(False), temporaries(True)
  assert remat < 0.6 * plain, (plain, remat)
  monkeypatch.setattr("hybrid_video.modes.compile.compiler_options", lambda platform: None)
  own_pipeline = temporaries(True)
  if jax.__version_info__ < (0, 11):
    assert own_pipeline > 0.9 * plain  # XLA:CPU's own pipeline in jax 0.10: remat lost
  else:
    assert own_pipeline < 0.6 * plain  # jax 0.11: kept (6.5 MiB against 11.0)


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [False, True])
def test_each_layer_adds_only_what_its_backward_must_keep(monkeypatch, scan_layers):
  """With remat, one more softmax layer adds to the train step's compiled temporaries about its
  saved inputs (clean and noisy, fp32) and its fp32 gradients (twice that with scan_layers,
  which also stacks the parameters). Before, XLA:CPU made every layer's zero-initialised loop
  buffers of the blocked teacher-forcing attention at the start of the step and held them to
  that layer's backward: about 4x the saved inputs per layer here (1.4 GiB per layer at Wan's
  7-chunk clip)."""
  from kernels.local_attention import xla as attention_xla
  monkeypatch.setattr(attention_xla, "TEACHER_FORCING_KEY_BLOCK", 32)  # blocked at this size
  c = default.get_config("softmax")
  c.model.dim, c.model.num_heads, c.model.mlp_dim, c.model.patch_size = 32, 2, 64, (1, 4, 4)
  c.model.remat, c.model.scan_layers = True, scan_layers
  c.train.batch_size = jax.device_count()  # one clip per device
  c.compile.clip_chunks = 8                # 8 chunks x 2 frames x 64 tokens
  mesh = sharding_lib.make_mesh(c.mesh)
  rules = sharding_lib.rules_from_config(c.mesh)

  def temporaries(layers):
    c.model.num_layers = layers
    return compile_steps(c, mesh, rules, ("train",), echo=False)["train"]["temp_size_in_bytes"]
  per_layer = (temporaries(4) - temporaries(2)) / 2
  tokens = c.compile.clip_chunks * c.model.frames_per_chunk * (32 // 4) ** 2
  inputs = 2 * tokens * c.model.dim * 4                      # clean and noisy, fp32
  params = count_params(CausalDiT(c.model, rngs=nnx.Rngs(0)).blocks[0]) * 4
  expected = inputs + params * (2 if scan_layers else 1)
  assert per_layer <= 1.5 * expected, (per_layer, inputs, params)


def test_compiler_options_keep_passes_disabled_by_xla_flags(monkeypatch):
  assert compiler_options("gpu") is None and compiler_options("tpu") is None
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                     "--xla_disable_hlo_passes=foo,bar")
  assert compiler_options("cpu") == {"xla_disable_hlo_passes": f"{CPU_REMAT_PASS},foo,bar"}
  monkeypatch.delenv("XLA_FLAGS")
  assert compiler_options("cpu") == {"xla_disable_hlo_passes": CPU_REMAT_PASS}
