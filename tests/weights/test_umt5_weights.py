"""umT5 weight import: the Wan and HF layouts, dtype casting and one-line errors."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from hybrid_video.nn.umt5 import UMT5Config
from hybrid_video.weights.io import WeightsError
from hybrid_video.weights.umt5 import HF, WAN, key_map, load_umt5, load_umt5_state

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "umt5")
WAN_FILE = os.path.join(FIXTURES, "wan_umt5.safetensors")
HF_DIR = os.path.join(FIXTURES, "hf")
TINY = UMT5Config.tiny()


def _flat(state) -> dict:
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def test_both_layouts_give_identical_trees():
  wan, hf = _flat(load_umt5_state(WAN_FILE, TINY)), _flat(load_umt5_state(HF_DIR, TINY))
  assert wan.keys() == hf.keys()
  for path in wan:
    np.testing.assert_array_equal(wan[path], hf[path], err_msg=str(path))
  # a kernel is the transpose of the file's [out, in] weight
  raw = load_file(WAN_FILE)
  np.testing.assert_array_equal(wan[("blocks", 1, "ffn", "gate", "kernel")],
                                raw["blocks.1.ffn.gate.0.weight"].T)


def test_key_maps_cover_every_parameter_and_the_file():
  paths = {p for p, _ in nnx.to_flat_state(load_umt5_state(WAN_FILE, TINY))}
  for layout in (WAN, HF):
    assert {t.path for t in key_map(layout, TINY).values()} == paths
  assert set(key_map(WAN, TINY)) == set(load_file(WAN_FILE))
  # the full model: 242 tensors in the released .pth
  assert len(key_map(WAN, UMT5Config())) == 242


def test_cast_to_param_dtype():
  enc = load_umt5(HF_DIR, TINY, "bfloat16")
  assert enc.config.param_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(nnx.state(enc, nnx.Param))} == {jnp.dtype("bfloat16")}


def test_hf_embedding_under_its_alias(tmp_path):
  tensors = load_file(WAN_FILE)
  hf = {}
  for name, target in key_map(HF, TINY).items():  # rebuild an HF file from the Wan one
    wan_name = next(n for n, t in key_map(WAN, TINY).items() if t == target)
    hf[name] = tensors[wan_name]
  hf["encoder.embed_tokens.weight"] = hf.pop("shared.weight")
  save_file(hf, str(tmp_path / "model.safetensors"))
  a, b = _flat(load_umt5_state(str(tmp_path / "model.safetensors"), TINY)), _flat(
      load_umt5_state(WAN_FILE, TINY))
  for path in a:
    np.testing.assert_array_equal(a[path], b[path])


def _rewrite(tmp_path, edit) -> str:
  tensors = load_file(WAN_FILE)
  edit(tensors)
  path = str(tmp_path / "edited.safetensors")
  save_file(tensors, path)
  return path


def test_missing_key(tmp_path):
  path = _rewrite(tmp_path, lambda t: t.pop("blocks.1.attn.v.weight"))
  with pytest.raises(WeightsError, match=r"missing 1 expected key\(s\): blocks.1.attn.v.weight"):
    load_umt5(path, TINY)


def test_unexpected_key(tmp_path):
  path = _rewrite(tmp_path, lambda t: t.update({"blocks.0.attn.extra.weight": np.zeros(3)}))
  with pytest.raises(WeightsError, match="unexpected key.*blocks.0.attn.extra.weight"):
    load_umt5(path, TINY)


def test_shape_mismatch_names_both_shapes(tmp_path):
  path = _rewrite(tmp_path, lambda t: t.update(
      {"blocks.0.ffn.fc1.weight": np.zeros((40, 32), np.float32)}))
  with pytest.raises(WeightsError, match=r"blocks.0.ffn.fc1.weight has shape \(40, 32\) but the "
                     r"config expects \(48, 32\)"):
    load_umt5(path, TINY)


def test_config_that_does_not_match_the_weights():
  with pytest.raises(WeightsError, match=r"token_embedding.weight has shape \(384, 32\).*"
                     r"\(500, 32\)"):
    load_umt5(WAN_FILE, UMT5Config.tiny(vocab_size=500))


def test_bad_and_missing_files(tmp_path):
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
  with pytest.raises(WeightsError, match="not a readable safetensors file"):
    load_umt5(str(bad), TINY)
  with pytest.raises(WeightsError, match="does not exist"):
    load_umt5(str(tmp_path / "nope.safetensors"), TINY)


def test_sharded_folder_with_a_missing_shard(tmp_path):
  folder = tmp_path / "hf"
  shutil.copytree(HF_DIR, folder)
  with open(folder / "model.safetensors.index.json") as f:
    shard = sorted(set(json.load(f)["weight_map"].values()))[1]
  os.remove(folder / shard)
  with pytest.raises(WeightsError, match="missing"):
    load_umt5(str(folder), TINY)
