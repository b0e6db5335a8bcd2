"""data/latent_clips.py: a tiny random Wan VAE encodes two tiny generated videos."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flax import nnx

from data import DataError
from data import latent_clips
from data import pipeline
from data import video_folder
from hybrid_video.nn.vae import VAE, StreamingVAE, VAEConfig
from tests.data.test_video_folder import write_video

SETTINGS = dict(num_frames=5, height=16, width=24, fps=5)  # 2 s at 5 fps: 2 clips per video


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  d = tmp_path_factory.mktemp("videos")
  write_video(d / "a.mp4", "mpeg4")
  write_video(d / "b.webm", "libvpx")
  write_video(d / "short.mp4", num_frames=3)
  return d


@pytest.fixture(scope="module")
def codec():
  return StreamingVAE(VAE(VAEConfig.tiny(), rngs=nnx.Rngs(0)))


def test_latent_clips_match_direct_encoding(folder, codec, tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    builder = latent_clips.prepare(folder, codec, tmp_path, vae_name="tiny-random",
                                   batch_size=3, **SETTINGS)
  assert "short.mp4" in caplog.text  # skipped by video_folder's scan, with its warning
  assert builder.info.metadata["skipped_files"] == ["short.mp4"]
  source = latent_clips.LatentSource(builder)
  assert len(source) == 4
  # The same clips through video_folder's reader, encoded directly (one clip per call).
  cfg = video_folder.make_config(folder, **SETTINGS)
  want = {}
  for name in ("a.mp4", "b.webm"):
    for index, _, video in video_folder.iter_clips(str(folder / name), cfg):
      x = latent_clips.to_unit_range(video)[None]
      want[(name, index)] = np.asarray(codec.encode(x))[0]
  for i in range(len(source)):
    example = source.example(i)
    latents = source[i]
    assert latents.shape == (2, 2, 3, 4) and latents.dtype == np.float32
    key = (example["file"].decode(), int(example["clip_index"]))
    np.testing.assert_allclose(latents, want[key], rtol=0, atol=1e-5 * np.abs(want[key]).max())
  # Readable without the VAE, from the prepared directory, and through the input pipeline.
  again = latent_clips.LatentSource(builder.data_dir)
  np.testing.assert_array_equal(again[0], source[0])
  batch = next(pipeline.make_iterator(builder, batch_size=2, shuffle=False, repeat=False))
  assert batch["latents"].shape == (2, 2, 2, 3, 4)


def test_errors(folder, codec, tmp_path):
  with pytest.raises(DataError, match="vae_name"):
    latent_clips.prepare(folder, codec, tmp_path, **SETTINGS)
  with pytest.raises(DataError, match="cannot encode clips of 4 frames"):
    latent_clips.prepare(folder, codec, tmp_path, vae_name="x", **dict(SETTINGS, num_frames=4))
  with pytest.raises(DataError, match="channels=3"):
    latent_clips.prepare(folder, codec, tmp_path, vae_name="x", **dict(SETTINGS, channels=1))
  with pytest.raises(DataError, match="does_not_exist"):
    latent_clips.prepare(tmp_path / "does_not_exist", codec, tmp_path, vae_name="x", **SETTINGS)
