"""Importing Wan DiT weights (hybrid_video/weights/wan_dit.py) against PyTorch references.

Fixtures: tests/fixtures/dit, written by `/work/fixenv/bin/python -m scripts.fixtures.make_dit`
(a tiny random diffusers WanTransformer3DModel in every layout, diffusers' outputs, an ARL2 layer
in the authors' layout with the output of a torch implementation of method doc §3).
No torch needed, except the tests marked `needs_torch` (a real `.pt` pickle), skipped without it.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest
from flax import nnx, traverse_util
from safetensors.numpy import save_file

from configs import wan as wan_configs
from hybrid_video import sharding as sharding_lib
from hybrid_video.checkpoint import Checkpointer
from hybrid_video.conversion import surgery
from hybrid_video.nn.embeddings import rope_angles
from hybrid_video.weights import io, pread, wan_dit, wan_dit_source
from hybrid_video.weights.io import WeightsError
from scripts import pth_to_safetensors
from tests.helpers import rel_err

FIX = os.path.join(os.path.dirname(__file__), "..", "fixtures", "dit")
TOL = 1e-5
F = 2  # frames per chunk of the fixtures
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="torch is optional; the .pt pickle tests need it")


def config(variant="tiny", path="diffusers", **weights):
  c = wan_configs.get_config(variant)
  c.weights.path = os.path.join(FIX, path)
  for k, v in weights.items():
    c.weights[k] = v
  return c


def flat(state):
  tree = state.to_pure_dict() if hasattr(state, "to_pure_dict") else state
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.fixture(scope="module")
def parity():
  return dict(np.load(os.path.join(FIX, "parity.npz")))


@pytest.fixture(scope="module")
def model():
  c = config()
  return wan_dit.load_model(c.model, c.weights)


# -- parity with diffusers -----------------------------------------------------------------------


def test_one_chunk_matches_diffusers(model, parity):
  """(a) One chunk, bidirectional: the streaming step and teacher forcing, per-frame t."""
  x, t, ctx = (jnp.asarray(parity[k]) for k in ("a_x", "a_t", "context"))
  out, _ = nnx.jit(lambda m: m.step(x, t, m.embed_condition(ctx, 2), m.init_carry(2, (8, 8)),
                                    write=False))(model)
  assert rel_err(out, parity["a_out"]) <= TOL
  tf = nnx.jit(lambda m: m.teacher_forcing(jnp.zeros_like(x), x, t, ctx))(model)
  assert rel_err(tf, parity["a_out"]) <= TOL
  assert np.abs(parity["a_out"]).max() > 0.1


def test_block_causal_chunks_match_diffusers_streaming(model, parity):
  """(b) Three chunks of block-causal attention, per-frame t: each context pass (write=True)
  computes what one block-causal forward over the whole video gives that chunk."""
  context = model.embed_condition(jnp.asarray(parity["context"]), 2)
  carry = model.init_carry(2, (8, 8), capacity_chunks=3)
  step = nnx.jit(lambda m, x, t, carry: m.step(x, t, context, carry, write=True))
  for n in range(3):
    sl = slice(n * F, (n + 1) * F)
    out, carry = step(model, jnp.asarray(parity["b_x"][:, sl]), jnp.asarray(parity["b_t"][:, sl]),
                      carry)
    assert rel_err(out, parity["b_out"][:, sl]) <= TOL, f"chunk {n}"


def test_teacher_forcing_matches_diffusers_prefixes(model, parity):
  """(c) Teacher forcing: noisy chunk n against a block-causal forward of [clean < n ; noisy n]."""
  args = [jnp.asarray(parity[k]) for k in ("c_clean", "c_noisy", "c_t", "context")]
  tf = nnx.jit(lambda m: m.teacher_forcing(*args))(model)
  for n in range(3):
    sl = slice(n * F, (n + 1) * F)
    assert rel_err(tf[:, sl], parity["c_out"][:, sl]) <= TOL, f"chunk {n}"


def test_rope_matches_wan_table_with_chunk_offsets():
  """Wan's float64 table at large frame positions, a traced chunk offset, and the fallback."""
  d, bt = 128, 44
  inv = 1.0 / 10000.0 ** (np.arange(0, bt, 2) / bt)
  for start in (0, 517, 1021):
    a = np.asarray(rope_angles(start, 3, 2, 2, d))[::4, :bt // 2]  # one token per frame
    want = np.arange(start, start + 3)[:, None] * inv
    np.testing.assert_allclose(np.cos(a), np.cos(want), atol=1e-6)
    np.testing.assert_allclose(np.sin(a), np.sin(want), atol=1e-6)
    traced = jax.jit(lambda s: rope_angles(s, 3, 2, 2, d))(jnp.int32(start))
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(rope_angles(start, 3, 2, 2, d)))
  beyond = np.asarray(jax.jit(lambda s: rope_angles(s, 1, 1, 1, d))(jnp.int32(1030)))
  np.testing.assert_allclose(np.cos(beyond[0, :bt // 2]), np.cos(1030 * inv), atol=2e-4)


# -- layouts -------------------------------------------------------------------------------------


def test_layouts_give_identical_parameter_trees():
  c = config()
  trees = {p: flat(wan_dit.load_params(c.model, config(path=p).weights))
           for p in ("diffusers", "diffusers/transformer", "original",
                     "original/diffusion_pytorch_model.safetensors",
                     "causal_forcing.safetensors")}
  first = trees.pop("diffusers")
  for name, tree in trees.items():
    assert tree.keys() == first.keys(), name
    for k in first:
      np.testing.assert_array_equal(tree[k], first[k], err_msg=f"{name}: {k}")


def test_detected_layouts_and_forced_layout_mismatch():
  for path, layout in (("diffusers", "diffusers"), ("original", "original"),
                       ("causal_forcing.safetensors", "pt")):
    assert wan_dit.open_source(config(path=path).weights).layout == layout
  with pytest.raises(WeightsError, match=r"weights.layout='diffusers' but .* original-layout"):
    wan_dit.open_source(config(path="original", layout="diffusers").weights)


@needs_torch
def test_pt_pickle_reads_the_configured_generator():
  c = config()
  ref = flat(wan_dit.load_params(c.model, config(path="original").weights))
  ema = flat(wan_dit.load_params(c.model, config(path="causal_forcing.pt").weights))
  gen = flat(wan_dit.load_params(c.model, config(path="causal_forcing.pt",
                                                 pt_key="generator").weights))
  for k in ref:
    np.testing.assert_array_equal(ema[k], ref[k])
  np.testing.assert_allclose(gen[("head", "bias")], ref[("head", "bias")] + 1.0, atol=1e-6)


# -- ARL2 hybrid layers --------------------------------------------------------------------------


def test_authors_hybrid_layer_matches_reference():
  """phi (grouped Conv1d, per-head transpose), gates and memory LoRA land where the layer reads
  them: layer 0's output equals the authors' formula; FFN LoRA on the hybrid layer is kept, on
  the softmax layer merged, and both MLPs match."""
  c = config("tiny_arl2", "arl2/arl2.safetensors")
  model = wan_dit.load_model(c.model, c.weights)
  d = np.load(os.path.join(FIX, "arl2", "layer.npz"))
  assert float(d["lora_alpha"]) == c.model.lora.alpha
  f, hp, wp = (int(v) for v in d["grid"])
  x = jnp.asarray(d["x"])
  angles = rope_angles(0, f, hp, wp, 16)

  @nnx.jit
  def outputs(model):
    y, _ = model.blocks[0].self_attn.teacher_forcing(x, x, angles, int(d["chunks"]))
    return y, model.blocks[0].ffn(x), model.blocks[1].ffn(x)

  y, mlp0, mlp1 = outputs(model)
  assert rel_err(y, d["attn_out"]) <= TOL
  assert model.blocks[0].ffn.fc1_lora is not None and model.blocks[1].ffn.fc1_lora is None
  assert rel_err(mlp0, d["mlp0_out"]) <= TOL
  assert rel_err(mlp1, d["mlp1_out"]) <= TOL


def test_softmax_import_into_hybrid_equals_conversion_init():
  """The hybrid parameters a softmax file lacks get exactly the values conversion gives them."""
  teacher_cfg = config().model
  teacher = wan_dit.load_model(teacher_cfg, config().weights)
  ccfg = ml_collections.ConfigDict({"hybrid": {"layers": (1,), "ratio": 0.75},
                                    "lora": {"rank": 4, "alpha": 32.0, "mlp": True,
                                             "memory": True}})
  student_cfg = surgery.student_model_config(teacher_cfg, ccfg, lora=True)
  converted = flat(nnx.state(surgery.convert(teacher, student_cfg, seed=3), nnx.Param))
  imported = flat(wan_dit.load_params(student_cfg, config(init_seed=3).weights))
  assert imported.keys() == converted.keys()
  for k in converted:
    np.testing.assert_array_equal(imported[k], converted[k], err_msg=str(k))
  phi = imported[("blocks", 1, "self_attn", "phi_q")]
  np.testing.assert_array_equal(phi, np.broadcast_to(np.eye(16), phi.shape))


# -- placement -----------------------------------------------------------------------------------


def test_placed_with_the_trainers_shardings_and_bf16_storage(model):
  c = config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  mesh = sharding_lib.make_mesh(c.mesh)
  rules = sharding_lib.rules_from_config(c.mesh)
  c.weights.dtype = "bfloat16"
  state = wan_dit.load_params(c.model, c.weights, mesh=mesh, rules=rules)
  specs = traverse_util.flatten_dict(
      sharding_lib.param_specs(state, rules, mesh).to_pure_dict())
  ref = flat(nnx.state(model, nnx.Param))
  arrays = traverse_util.flatten_dict(state.to_pure_dict())
  for k, x in arrays.items():
    assert x.sharding == jax.sharding.NamedSharding(mesh, specs[k]), k
    bf16 = k[-1] == "kernel" and k[0] != "time_embed"
    assert x.dtype == (jnp.bfloat16 if bf16 else jnp.float32), k
    np.testing.assert_allclose(np.asarray(x, np.float32), ref[k], rtol=1e-2, atol=1e-2)
  assert specs[("blocks", 0, "self_attn", "q", "kernel")] == jax.sharding.PartitionSpec("fsdp",
                                                                                      "tensor")


# -- errors and the checkpoint -------------------------------------------------------------------


def _edited_original(tmp_path, edit):
  tensors = dict(io.iter_safetensors(os.path.join(FIX, "original")))
  edit(tensors)
  path = str(tmp_path / "w.safetensors")
  save_file(tensors, path)
  return path


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("blocks.1.ffn.0.bias"), r"missing 1 expected key\(s\): blocks.1.ffn.0.bias"),
    (lambda t: t.update({"blocks.0.extra.weight": np.zeros(2, np.float32)}),
     r"1 unexpected key\(s\): blocks.0.extra.weight"),
    (lambda t: t.update({"blocks.0.ffn.0.weight": np.zeros((48, 32), np.float32)}),
     r"blocks.0.ffn.0.weight has shape \(48, 32\) but the config expects \(64, 32\)"),
], ids=["missing", "unexpected", "shape"])
def test_key_and_shape_errors(tmp_path, edit, message):
  c = config(path=_edited_original(tmp_path, edit))
  with pytest.raises(WeightsError, match=message):
    wan_dit.load_params(c.model, c.weights)


def test_not_a_checkpoint(tmp_path):
  bad = tmp_path / "x.safetensors"
  bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
  other = tmp_path / "vae.safetensors"
  save_file({"decoder.conv.weight": np.zeros(3, np.float32)}, str(other))
  (tmp_path / "empty").mkdir()
  (tmp_path / "notes.txt").write_text("hello")
  for path, message in ((bad, "is not a safetensors file"), (other, "does not hold Wan DiT"),
                        (tmp_path / "notes.txt", "is not a .safetensors file"),
                        (tmp_path / "missing", "does not exist"),
                        (tmp_path / "empty", "no .safetensors files")):
    c = config(path=str(path))
    with pytest.raises(WeightsError, match=message):
      wan_dit.load_params(c.model, c.weights)


def test_config_and_weights_mismatch():
  c = config(path="original")
  c.model.num_heads = 4  # invisible in the shapes: config.json tells
  with pytest.raises(WeightsError, match=r"num_heads=2 in the file, model.num_heads=4"):
    wan_dit.load_params(c.model, c.weights)
  c = config(path="causal_forcing.safetensors")
  c.model.mlp_dim = 48
  with pytest.raises(WeightsError, match=r"has shape \(64, 32\) but the config expects \(48, 32"):
    wan_dit.load_params(c.model, c.weights)
  c = config("tiny", "arl2/arl2.safetensors")
  with pytest.raises(WeightsError, match=r"has ARL2 hybrid layers \[0\] but .* are \[\]"):
    wan_dit.load_params(c.model, c.weights)
  c = config("tiny_arl2", "arl2/arl2.safetensors")
  c.model.lora.memory = False
  with pytest.raises(WeightsError, match=r"lora.rank=4 --config.model.lora.memory=True"):
    wan_dit.load_params(c.model, c.weights)
  c.model.lora.memory, c.model.lora.rank = True, 8
  with pytest.raises(WeightsError, match=r"lora_q_A has shape \(32, 4\) but .* \(32, 8\)"):
    wan_dit.load_params(c.model, c.weights)
  c = config()
  c.model.cond = "labels"
  with pytest.raises(WeightsError, match="model.cond='embeddings'"):
    wan_dit.load_params(c.model, c.weights)


@needs_torch
def test_pickle_that_weights_only_refuses():
  c = config(path="unsafe.pt")
  with pytest.raises(WeightsError, match="refuses"):
    wan_dit.load_params(c.model, c.weights)


def test_pickle_entry_selection_errors():
  with pytest.raises(WeightsError, match=r"no 'generator_ema' entry .*weights.pt_key"):
    wan_dit_source._torch_state_dict({"generator": {}}, "generator_ema", "cf.pt")
  with pytest.raises(WeightsError, match=r"not tensors"):
    wan_dit_source._torch_state_dict({"step": 3}, "generator_ema", "cf.pt")


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_pickle_without_torch_says_how_to_install_or_convert():
  c = config(path="causal_forcing.pt")
  with pytest.raises(WeightsError, match="pip install torch.*pth_to_safetensors"):
    wan_dit.load_params(c.model, c.weights)


def test_import_writes_a_checkpoint_only_on_success(tmp_path):
  bad = config(path="arl2/arl2.safetensors")  # hybrid file, softmax config
  with pytest.raises(WeightsError):
    wan_dit.import_weights(bad, str(tmp_path / "bad"))
  assert not os.path.exists(tmp_path / "bad")
  c = config()
  directory = wan_dit.import_weights(c, str(tmp_path / "run"))
  saved = Checkpointer(str(tmp_path / "run"))
  try:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            {"step": jnp.zeros((), jnp.int32),
                             "params": wan_dit.load_params(c.model, c.weights)})
    state, step = saved.restore(abstract)
    assert step == 0 and saved.saved_config(0)["weights"]["path"] == c.weights.path
  finally:
    saved.close()
  ref = flat(wan_dit.load_params(c.model, c.weights))
  for k, v in flat(state["params"]).items():
    np.testing.assert_array_equal(v, ref[k])
  assert directory == os.path.abspath(tmp_path / "run" / "checkpoints")
  with pytest.raises(WeightsError, match="already holds checkpoints"):
    wan_dit.import_weights(c, str(tmp_path / "run"))


# -- file reading and conversion -----------------------------------------------------------------


def test_streamed_safetensors_round_trip_bf16_and_truncation(tmp_path):
  """scripts/pth_to_safetensors.py's writer and pread's reader (no torch, no memory map) agree
  with the safetensors library; a truncated file is an error."""
  arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
            "b": np.linspace(-2, 2, 5).astype(ml_dtypes.bfloat16), "c": np.ones((), np.int64)}
  path = str(tmp_path / "x.safetensors")
  pth_to_safetensors.write_safetensors(
      path, [(k, v.shape, v.dtype.name) for k, v in arrays.items()], arrays.__getitem__,
      {"source": "test"})
  for reader, names in ((pread.iter_safetensors, "abc"), (io.iter_safetensors, "ab")):
    got = dict(reader(path))  # (io's flax reader turns int64 into int32 without jax x64)
    for k in names:
      assert got[k].dtype == arrays[k].dtype and got[k].shape == arrays[k].shape
      np.testing.assert_array_equal(got[k], arrays[k])
  assert all(x.ctypes.data % pread.ALIGN == 0 for _, x in pread.iter_safetensors(path))
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:-8])
  with pytest.raises(WeightsError, match="truncated"):
    list(pread.iter_safetensors(path))


@needs_torch
def test_pth_to_safetensors_gives_the_pt_layout(tmp_path):
  dst = str(tmp_path / "cf.safetensors")
  assert pth_to_safetensors.main([os.path.join(FIX, "causal_forcing.pt"), dst]) == 0
  c = config()
  ref = flat(wan_dit.load_params(c.model, config(path="original").weights))
  got = flat(wan_dit.load_params(c.model, config(path=dst).weights))
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k])
  assert pth_to_safetensors.main([os.path.join(FIX, "unsafe.pt"), dst]) == 1
