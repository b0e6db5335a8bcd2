"""umT5 encoder vs transformers' UMT5EncoderModel (tests/fixtures/umt5, made by
scripts/fixtures/make_umt5.py).

Parity is checked at EVERY position, padded queries included: the reference computes them the
same way (padded keys masked, padded queries attending to the real keys), so comparing all of
them also catches a mask applied to the wrong axis. The zeroing Wan applies afterwards is
tested in tests/test_text.py.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from hybrid_video import sharding as sharding_lib
from hybrid_video.nn import umt5
from hybrid_video.weights.umt5 import load_umt5

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "umt5")
TOL = {"float32": 1e-5, "bfloat16": 3e-2}  # max|a - b| / max|b|


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(os.path.join(FIXTURES, "reference.npz")))


@pytest.fixture(scope="module")
def encoder():
  return load_umt5(os.path.join(FIXTURES, "hf"), umt5.UMT5Config.tiny())


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def test_tiny_config_is_the_fixture_config():
  with open(os.path.join(FIXTURES, "config.json")) as f:
    assert dataclasses.asdict(umt5.UMT5Config.tiny()) == json.load(f)


def test_full_config_parameter_count():
  # embedding 256384 * 4096 + 24 * (4 * 4096^2 + 3 * 4096 * 10240 + 32 * 64 + 2 * 4096) + 4096
  assert umt5.param_count(umt5.UMT5Config()) == 5_680_910_336


def test_relative_position_buckets_match_reference(ref):
  rel = ref["rel"]  # key - query = -300 .. 300
  n = (len(rel) - 1) // 2
  buckets = umt5.relative_position_buckets(n + 1, 2 * n + 1, 32, 128)[n]
  np.testing.assert_array_equal(buckets, ref["buckets"])


def test_parity_fp32_all_positions(encoder, ref):
  out = encoder(jnp.asarray(ref["ids"]), jnp.asarray(ref["mask"]))
  assert out.shape == ref["out"].shape and out.dtype == jnp.float32
  err = rel_err(out, ref["out"])
  assert err <= TOL["float32"], err


def test_padding_does_not_change_real_positions(encoder, ref):
  """Prompt 1 (61 real tokens) alone and unpadded gives the same real rows as in the batch."""
  n = int(ref["mask"][1].sum())
  ids = jnp.asarray(ref["ids"][1:2, :n])
  alone = encoder(ids, jnp.ones_like(ids))
  assert rel_err(alone[0], ref["out"][1, :n]) <= TOL["float32"]


def test_bf16_compute_close_to_fp32(ref):
  cfg = umt5.UMT5Config.tiny(dtype="bfloat16", param_dtype="bfloat16")
  enc = load_umt5(os.path.join(FIXTURES, "wan_umt5.safetensors"), cfg)
  assert enc.blocks[0].attn.q.kernel[...].dtype == jnp.bfloat16
  out = enc(jnp.asarray(ref["ids"]), jnp.asarray(ref["mask"]))
  assert out.dtype == jnp.float32
  assert rel_err(out, ref["out"]) <= TOL["bfloat16"]


def test_default_config_is_bf16():
  cfg = umt5.UMT5Config()
  assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "bfloat16")


def test_sharded_load_and_forward_equal_unsharded(encoder, ref):
  mesh = jax.make_mesh((1, 2, 4, 1), sharding_lib.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)
  sharded = load_umt5(os.path.join(FIXTURES, "wan_umt5.safetensors"), umt5.UMT5Config.tiny(),
                      mesh=mesh)
  q = sharded.blocks[0].attn.q.kernel[...]
  assert q.sharding == NamedSharding(mesh, P("fsdp", "tensor"))
  assert sharded.blocks[1].ffn.fc2.kernel[...].sharding.spec == P("tensor", "fsdp")
  ids, mask = jnp.asarray(ref["ids"]), jnp.asarray(ref["mask"])
  with sharding_lib.activation_sharding(mesh):
    out = jax.jit(lambda i, m: sharded(i, m))(ids, mask)
  np.testing.assert_allclose(np.asarray(out), np.asarray(encoder(ids, mask)), rtol=0, atol=2e-5)


def test_mismatched_ids_and_mask_shapes_raise(encoder):
  with pytest.raises(ValueError, match="must be the same"):
    encoder(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 5), jnp.int32))
