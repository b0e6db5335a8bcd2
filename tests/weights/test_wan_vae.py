"""Importing Wan VAE weights: both layouts, the kernel layout, and one-line errors (no torch)."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from hybrid_video.nn.vae import VAE, VAEConfig
from hybrid_video.weights import io
from hybrid_video.weights import wan_vae
from hybrid_video.weights.io import WeightsError

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "vae")
DIFFUSERS_DIR = os.path.join(FIXTURES, "diffusers")
DIFFUSERS_FILE = os.path.join(DIFFUSERS_DIR, "diffusion_pytorch_model.safetensors")
WAN_FILE = os.path.join(FIXTURES, "wan", "Wan2.1_VAE.safetensors")


@pytest.fixture(scope="module")
def config():
  with open(os.path.join(FIXTURES, "meta.json")) as f:
    return VAEConfig(**json.load(f))


def flat(vae: VAE) -> dict:
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(vae, nnx.Param))}


def file_tensors(path: str) -> dict[str, np.ndarray]:
  return {k: np.asarray(v, np.float32) for k, v in io.iter_safetensors(path)}


def test_both_layouts_give_identical_trees(config):
  from_dir = wan_vae.load_vae(DIFFUSERS_DIR, config)
  from_file = wan_vae.load_vae(DIFFUSERS_FILE, config)
  from_wan = wan_vae.load_vae(WAN_FILE, config)
  assert nnx.graphdef(from_dir) == nnx.graphdef(from_wan)
  a, b, c = flat(from_dir), flat(from_file), flat(from_wan)
  assert a.keys() == b.keys() == c.keys() and len(a) == 194
  for path in a:
    assert a[path].dtype == np.float32, path
    np.testing.assert_array_equal(a[path], c[path], err_msg=str(path))
    np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))


def test_kernel_layout_and_names(config):
  vae = wan_vae.load_vae(WAN_FILE, config)
  tensors = file_tensors(WAN_FILE)
  # torch Conv3d [out, in, t, h, w] -> [t, h, w, in, out]; Conv2d [out, in, h, w] -> [h, w, in, out]
  w = tensors["decoder.conv1.weight"]
  np.testing.assert_array_equal(vae.decoder.conv_in.kernel[...], w.transpose(2, 3, 4, 1, 0))
  w = tensors["decoder.upsamples.3.resample.1.weight"]
  np.testing.assert_array_equal(vae.decoder.up[3].conv.kernel[...], w.transpose(2, 3, 1, 0))
  # The upsampler of level 1 and the shortcut of the first residual block of level 1.
  w = tensors["decoder.upsamples.7.time_conv.weight"]
  np.testing.assert_array_equal(vae.decoder.up[7].time_conv.kernel[...], w.transpose(2, 3, 4, 1, 0))
  np.testing.assert_array_equal(vae.decoder.up[4].shortcut.bias[...],
                                tensors["decoder.upsamples.4.shortcut.bias"])
  np.testing.assert_array_equal(vae.encoder.mid.attn.norm.gamma[...],
                                tensors["encoder.middle.1.norm.gamma"].reshape(-1))
  np.testing.assert_array_equal(vae.quant_conv.kernel[...].reshape(8, 8).T,
                                tensors["conv1.weight"].reshape(8, 8))
  maps = wan_vae.key_maps(vae)
  assert set(maps[wan_vae.WAN]) == set(tensors)
  assert set(maps[wan_vae.DIFFUSERS]) == set(file_tensors(DIFFUSERS_FILE))
  assert maps[wan_vae.DIFFUSERS]["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"] == \
      maps[wan_vae.WAN]["decoder.upsamples.4.shortcut.weight"]


def test_compute_dtype_keeps_fp32_params(config):
  vae = wan_vae.load_vae(WAN_FILE, config, dtype=jnp.bfloat16)
  assert vae.dtype == jnp.bfloat16
  assert {v.dtype for v in flat(vae).values()} == {np.dtype(np.float32)}


def test_load_into_existing_module(config):
  vae = VAE(config, rngs=nnx.Rngs(0))
  wan_vae.load_vae_weights(vae, WAN_FILE)
  want = flat(wan_vae.load_vae(DIFFUSERS_DIR, config))
  for path, value in flat(vae).items():
    np.testing.assert_array_equal(value, want[path])


def test_pth_goes_through_load_torch(config, monkeypatch):
  """A .pth is read with io.load_torch (torch-free here: the loader is replaced)."""
  calls = []

  def fake_load_torch(path):
    calls.append(path)
    return file_tensors(WAN_FILE)

  monkeypatch.setattr(io, "load_torch", fake_load_torch)
  monkeypatch.setattr(io, "iter_torch_state_dict", lambda state, where: iter(state.items()))
  vae = wan_vae.load_vae("/nowhere/Wan2.1_VAE.pth", config)
  assert calls == ["/nowhere/Wan2.1_VAE.pth"]
  want = flat(wan_vae.load_vae(WAN_FILE, config))
  for path, value in flat(vae).items():
    np.testing.assert_array_equal(value, want[path])


def test_real_pth_with_torch(config, tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "Wan2.1_VAE.pth"
  torch.save({k: torch.from_numpy(v) for k, v in file_tensors(WAN_FILE).items()}, path)
  want = flat(wan_vae.load_vae(WAN_FILE, config))
  for p, value in flat(wan_vae.load_vae(str(path), config)).items():
    np.testing.assert_array_equal(value, want[p])


def _write(tmp_path, tensors, name="vae.safetensors") -> str:
  path = str(tmp_path / name)
  save_file(tensors, path)
  return path


def test_missing_and_unexpected_keys(config, tmp_path):
  tensors = file_tensors(WAN_FILE)
  del tensors["decoder.upsamples.7.time_conv.bias"]
  path = _write(tmp_path, tensors)
  with pytest.raises(WeightsError,
                     match="missing 1 expected key.*decoder.upsamples.7.time_conv.bias"):
    wan_vae.load_vae(path, config)
  tensors = file_tensors(DIFFUSERS_FILE)
  tensors["decoder.extra.weight"] = np.zeros(3, np.float32)
  path = _write(tmp_path, tensors, "extra.safetensors")
  with pytest.raises(WeightsError, match="1 unexpected key.*decoder.extra.weight"):
    wan_vae.load_vae(path, config)
  with pytest.raises(WeightsError, match="wan VAE layout"):
    wan_vae.load_vae(DIFFUSERS_FILE, config, layout="wan")


def test_shape_mismatch_names_both_shapes(config):
  wider = VAEConfig(base_dim=8, z_dim=4)
  with pytest.raises(WeightsError) as info:
    wan_vae.load_vae(WAN_FILE, wider)
  assert str(info.value) == (
      f"{WAN_FILE}: encoder.conv1.weight has shape (4, 3, 3, 3, 3) but the config expects "
      f"(8, 3, 3, 3, 3)")


def test_not_a_checkpoint(config, tmp_path):
  junk = tmp_path / "junk.safetensors"
  junk.write_bytes(b"\x00\x01 not a safetensors file")
  with pytest.raises(WeightsError, match="junk.safetensors"):
    wan_vae.load_vae(str(junk), config)
  text = tmp_path / "notes.txt"
  text.write_text("hello")
  with pytest.raises(WeightsError, match="not a .safetensors file"):
    wan_vae.load_vae(str(text), config)
  pth = tmp_path / "junk.pth"
  pth.write_bytes(b"not a pickle")
  with pytest.raises(WeightsError, match="junk.pth"):
    wan_vae.load_vae(str(pth), config)
  other = _write(tmp_path, {"model.weight": np.zeros((2, 2), np.float32)}, "other.safetensors")
  with pytest.raises(WeightsError, match="is not a Wan VAE checkpoint"):
    wan_vae.load_vae(other, config)
  with pytest.raises(WeightsError, match="does not exist"):
    wan_vae.load_vae(str(tmp_path / "absent"), config)
