"""The Wan VAE against diffusers fixtures, and its streaming invariants.

Fixtures: tests/fixtures/vae (`/work/fixenv/bin/python -m scripts.fixtures.make_vae`); the
references are diffusers' AutoencoderKLWan run in fp64. Parity: max|a - b| / max|b| <= 1e-5.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_video.errors import UserError
from hybrid_video.nn import vae as vae_lib
from hybrid_video.weights.wan_vae import load_vae

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "vae")
TOL = {jnp.float32: 1e-5, jnp.float64: 1e-12}


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def ref():
  with open(os.path.join(FIXTURES, "meta.json")) as f:
    config = vae_lib.VAEConfig(**json.load(f))
  return config, dict(np.load(os.path.join(FIXTURES, "io.npz")))


@pytest.fixture(scope="module")
def codec(ref):
  return vae_lib.StreamingVAE(load_vae(os.path.join(FIXTURES, "diffusers"), ref[0]))


def stream(codec, latents, sizes):
  """Decode `latents` in chunks of `sizes` latents; returns (frames, per-chunk frame counts)."""
  b, _, h, w, _ = latents.shape
  cache, outs, start = codec.init_decode_cache(b, h, w), [], 0
  for n in sizes:
    frames, cache = codec.decode_chunk(cache, latents[:, start:start + n])
    outs.append(np.asarray(frames))
    start += n
  return np.concatenate(outs, axis=1), [o.shape[1] for o in outs]


def test_decode_whole_matches_diffusers(codec, ref):
  _, io = ref
  out = codec.decode(jnp.asarray(io["latents"]))
  assert out.shape == io["decode_whole"].shape == (1, 21, 16, 24, 3)
  assert rel_err(out, io["decode_whole"]) <= TOL[jnp.float32]
  assert rel_err(out, io["decode_chunk1"]) <= TOL[jnp.float32]
  assert float(jnp.abs(out).max()) == 1.0  # the fixture reaches the clamp


def test_streaming_decode_matches_diffusers_and_whole(codec, ref):
  _, io = ref
  latents = jnp.asarray(io["latents"])
  whole = np.asarray(codec.decode(latents))
  by3, counts3 = stream(codec, latents, [3, 3])
  by1, counts1 = stream(codec, latents, [1] * 6)
  assert counts3 == [9, 12] and counts1 == [1, 4, 4, 4, 4, 4]
  assert rel_err(by3, io["decode_chunk3"]) <= TOL[jnp.float32]
  assert rel_err(by1, io["decode_chunk1"]) <= TOL[jnp.float32]
  # Same frames as one whole call, up to fp32 rounding of differently shaped convs.
  assert rel_err(by3, whole) <= 1e-6 and rel_err(by1, whole) <= 1e-6


@pytest.mark.slow
def test_streaming_decode_is_exact_in_fp64(ref):
  """In fp64 the chunked decode equals the whole one to rounding: the cache logic is exact."""
  config, io = ref
  with jax.enable_x64(True):
    vae = load_vae(os.path.join(FIXTURES, "diffusers"), config, dtype=jnp.float64)
    latents = jnp.asarray(io["latents"])
    whole = np.asarray(nnx.jit(lambda m, x: m.decode(x))(vae, latents))
    step = nnx.jit(lambda m, c, x: m.decode_chunk(c, x))
    f1, cache = step(vae, None, latents[:, :2])
    f2, cache = step(vae, cache, latents[:, 2:4])
    f3, _ = step(vae, cache, latents[:, 4:])
  assert whole.dtype == np.float64
  assert rel_err(np.concatenate([f1, f2, f3], axis=1), whole) <= TOL[jnp.float64]
  assert rel_err(whole, io["decode_whole"]) <= 1e-6  # the fp64 references, stored in fp32


def test_bf16_compute(ref):
  config, io = ref
  codec = vae_lib.StreamingVAE(load_vae(os.path.join(FIXTURES, "diffusers"), config,
                                        dtype=jnp.bfloat16))
  cache = codec.init_decode_cache(1, 2, 3)
  assert {a.dtype for a in cache.convs} == {jnp.dtype(jnp.bfloat16)}
  frames, cache = codec.decode_chunk(cache, jnp.asarray(io["latents"][:, :2]))
  assert frames.dtype == jnp.float32 and {a.dtype for a in cache.convs} == {jnp.dtype(jnp.bfloat16)}
  err = rel_err(frames, io["decode_whole"][:, :5])
  assert 1e-4 < err < 5e-2, err  # bf16 rounding, not a different computation


def test_cache_is_constant_and_step_compiles_once(codec, ref):
  config = ref[0]
  latents = jax.random.normal(jax.random.key(0), (1, 50, 2, 3, config.z_dim))
  cache = codec.init_decode_cache(1, 2, 3)
  assert cache.first and all(not np.any(np.asarray(a)) for a in cache.convs)
  spec = lambda c: [(a.shape, a.dtype) for a in c.convs]
  before = codec.traces.copy()
  for n in range(50):
    frames, cache = codec.decode_chunk(cache, latents[:, n:n + 1])
    assert frames.shape == (1, 1 if n == 0 else 4, 16, 24, 3)
    if n == 1:
      after_2, bytes_2, traces_2 = spec(cache), vae_lib.cache_bytes(cache), codec.traces.copy()
  assert not cache.first
  assert spec(cache) == after_2 and vae_lib.cache_bytes(cache) == bytes_2
  assert codec.traces == traces_2  # chunks 3..50 reuse the step traced for chunk 2
  assert codec.traces["decode_chunk"] - before["decode_chunk"] <= 1
  # One entry per kernel-3 causal conv (2 frames each) and per temporal upsampler.
  assert len(cache.convs) == 32
  assert all(a.shape[1] == vae_lib.CACHE_T for a in cache.convs)


def test_encode_matches_diffusers(codec, ref):
  config, io = ref
  mean, std = np.asarray(config.mean, np.float32), np.asarray(config.std, np.float32)
  want = (io["enc_mean"] - mean) / std
  latents = codec.encode(jnp.asarray(io["video"]))
  assert latents.shape == (1, 3, 3, 4, config.z_dim)
  assert rel_err(latents, want) <= TOL[jnp.float32]
  assert codec.traces["encode_chunk_first"] == 1 and codec.traces["encode_chunk"] == 1


def test_encode_sample_with_key(codec, ref):
  config, io = ref
  moments = jnp.concatenate([io["enc_mean"], io["enc_logvar"]], axis=-1)
  key = jax.random.key(3)
  sample = codec.module.normalise(moments, key)
  noise = jax.random.normal(key, io["enc_mean"].shape)
  want = (io["enc_mean"] + np.exp(0.5 * io["enc_logvar"]) * noise - np.asarray(config.mean)) / \
      np.asarray(config.std)
  assert rel_err(sample, want) <= 1e-6
  assert rel_err(sample, codec.module.normalise(moments)) > 1e-3


def test_encode_chunks_and_errors(ref):
  config = dataclasses.replace(ref[0], latents_mean=None, latents_std=None)
  assert config.mean == (0.0,) * 4 and vae_lib.VAEConfig().mean == vae_lib.WAN21_LATENTS_MEAN
  chunks = vae_lib.split_encode_chunks(jnp.zeros((1, 13, 8, 8, 3)), 4, 8)
  assert [c.shape[1] for c in chunks] == [1, 8, 4]
  with pytest.raises(UserError, match="1 \\+ a multiple of 4"):
    vae_lib.split_encode_chunks(jnp.zeros((1, 8, 8, 8, 3)))
  with pytest.raises(UserError, match="chunk_frames=6"):
    vae_lib.split_encode_chunks(jnp.zeros((1, 9, 8, 8, 3)), 4, 6)
  vae = nnx.eval_shape(lambda: vae_lib.VAE(vae_lib.VAEConfig.tiny(), rngs=nnx.Rngs(0)))
  with pytest.raises(UserError, match="must be 1 \\+ a multiple of 4"):
    jax.eval_shape(lambda x: vae.encode_chunk(None, x), jnp.zeros((1, 4, 8, 8, 3)))
  with pytest.raises(UserError, match="temporal_downsample"):
    vae_lib.VAEConfig(temporal_downsample=(True,))
  with pytest.raises(UserError, match="latents_std"):
    vae_lib.VAEConfig(z_dim=4, latents_std=(1.0,))
