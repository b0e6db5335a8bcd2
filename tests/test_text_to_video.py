"""Text to video with tiny random parts: the streaming DiT in latent space, the streaming VAE,
prompt schedules and switching (the end-to-end command with real on-disk layouts is in
tests/modes/)."""

import hashlib

import jax
import numpy as np
import pytest
from flax import nnx

from configs.default import get_config
from hybrid_video import sharding as sharding_lib
from hybrid_video.errors import UserError
from hybrid_video.nn.model import CausalDiT
from hybrid_video.nn.vae import VAE, StreamingVAE, VAEConfig
from hybrid_video.text_to_video import (TextToVideo, chunk_start_frame, chunk_video_frames,
                                        num_chunks_for, parse_prompt_schedule)
from tests.helpers import open_memory_gates, perturbed

TEXT_DIM, TOKENS = 16, 8


def fake_embed(prompts):
  """Deterministic per-prompt embeddings [len, TOKENS, TEXT_DIM] (stands in for umT5)."""
  out = []
  for p in prompts:
    seed = int.from_bytes(hashlib.sha256(p.encode()).digest()[:4], "little")
    out.append(np.random.default_rng(seed).normal(size=(TOKENS, TEXT_DIM)).astype(np.float32))
  return np.stack(out)


@pytest.fixture(scope="module")
def t2v():
  cfg = get_config().model
  cfg.in_channels = cfg.out_channels = 4      # the tiny VAE's z_dim
  cfg.patch_size = (1, 2, 2)
  cfg.frames_per_chunk = 2                    # latent frames per chunk
  cfg.dim, cfg.num_heads, cfg.mlp_dim, cfg.num_layers = 48, 2, 64, 2
  cfg.cond, cfg.text_dim = "embeddings", TEXT_DIM
  cfg.hybrid.ratio = 0.5
  cfg.gdn_chunk_size = 8
  model = open_memory_gates(perturbed(CausalDiT(cfg, rngs=nnx.Rngs(0)), seed=1))
  scfg = get_config("wan1_3b").sampler        # few_step [1000, 750, 500, 250], shift 5
  vae = StreamingVAE(VAE(VAEConfig.tiny(), rngs=nnx.Rngs(2)))
  return TextToVideo(model, scfg, vae, fake_embed, latent_hw=(4, 4))


def _run(t2v, schedule, num_frames, seed=0):
  frames = []
  stats = t2v.stream(schedule, num_frames, seed=seed, on_frames=frames.append, progress=False)
  return np.concatenate(frames), stats


def test_frame_counts_follow_the_vae_rule():
  assert [chunk_video_frames(n, 3) for n in range(3)] == [9, 12, 12]
  assert [chunk_start_frame(n, 3) for n in range(3)] == [0, 9, 21]
  assert num_chunks_for(9, 3) == 1 and num_chunks_for(10, 3) == 2 and num_chunks_for(21, 3) == 2


def test_stream_gives_the_requested_frames_and_repeats_with_the_seed(t2v):
  video, stats = _run(t2v, [(0, "a cat walks")], 5 + 8 + 3)   # F=2: 5, then 8 per chunk
  assert video.shape == (16, 32, 32, 3)
  assert stats.num_chunks == 3 and stats.sampler_compiles >= 1
  assert np.all(np.abs(video) <= 1.0) and video.std() > 0
  again, _ = _run(t2v, [(0, "a cat walks")], 16)
  np.testing.assert_array_equal(video, again)
  other_seed, _ = _run(t2v, [(0, "a cat walks")], 16, seed=1)
  assert np.abs(other_seed - video).max() > 1e-3


def test_prompt_switch_keeps_the_frames_before_it_and_changes_those_after(t2v):
  plain, _ = _run(t2v, [(0, "a cat walks")], 21)
  switched, stats = _run(t2v, [(0, "a cat walks"), (13, "the cat sits down")], 21)
  assert stats.prompts_at_chunk == {0: 0, 1: 0, 2: 1}   # chunk 2 starts at frame 13
  np.testing.assert_array_equal(switched[:13], plain[:13])
  assert np.abs(switched[13:] - plain[13:]).max() > 1e-3


def test_parse_prompt_schedule():
  assert parse_prompt_schedule("a cat walks") == [(0, "a cat walks")]
  assert parse_prompt_schedule('0:"a cat walks" 120:"the cat sits down"') == [
      (0, "a cat walks"), (120, "the cat sits down")]
  assert parse_prompt_schedule(r'0:"say \"hi\""') == [(0, 'say "hi"')]
  for bad in ("", "   ", '5:"late start"', '0:"a" 0:"b"', '0:"a" 9:""', '0:"a" junk'):
    with pytest.raises(UserError):
      parse_prompt_schedule(bad)


def test_on_a_mesh_equals_one_device(t2v):
  """The DiT sharded over 8 fake devices (fsdp=4 x data=2), the VAE replicated: the same frames."""
  want, _ = _run(t2v, [(0, "a cat walks"), (9, "it sits")], 5 + 8 + 8)
  mesh_cfg = get_config().mesh
  mesh_cfg.data, mesh_cfg.fsdp = 2, 4
  mesh = sharding_lib.make_mesh(mesh_cfg)
  vae = StreamingVAE(t2v.vae.module)
  sharded = TextToVideo(t2v.model, t2v.sampler.scfg, vae, fake_embed, latent_hw=(4, 4),
                        mesh=mesh, rules=sharding_lib.rules_from_config(mesh_cfg))
  assert len(jax.tree.leaves(sharded.sampler.state)[0].devices()) == 8
  got, _ = _run(sharded, [(0, "a cat walks"), (9, "it sits")], 5 + 8 + 8)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
