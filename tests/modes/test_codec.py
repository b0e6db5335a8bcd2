"""--mode=encode / --mode=decode (hybrid_video/modes/codec.py) with the tiny VAE fixture, and the
latent_clips data source that training and conversion read."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs import wan
from data import latent_clips, video_folder
from hybrid_video import inputs as inputs_lib
from hybrid_video import sharding as sharding_lib
from hybrid_video.errors import UserError
from hybrid_video.modes import codec as codec_mode
from hybrid_video.nn.model import CausalDiT
from hybrid_video.video_io import read_video
from hybrid_video.weights.wan_folder import load_streaming_vae
from tests.data.test_video_folder import SRC_FPS, write_video

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VAE_DIR = os.path.join(ROOT, "tests", "fixtures", "vae", "diffusers")
LATENTS = 4  # latent frames per clip: 1 + 4 * 3 = 13 video frames, one clip per 20-frame video


def tiny_config(folder=None, latents_dir=None):
  c = wan.get_config("tiny")
  c.t2v.vae = VAE_DIR
  c.t2v.vae_dtype = "float32"
  c.model.cond = "none"
  c.data.frame_size = (4, 4)   # 32x32 pixels through the tiny VAE (spatial factor 8)
  c.data.num_frames = LATENTS
  c.data.fps = float(SRC_FPS)
  c.data.folder = str(folder) if folder else None
  c.codec.batch_size = 2
  c.progress = False
  c.train.batch_size = 2
  if latents_dir:
    c.data.source = "latent_clips"
    c.data.latents = latents_dir
  return c


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  d = tmp_path_factory.mktemp("videos")
  write_video(d / "a.mp4", "mpeg4")
  write_video(d / "b.mp4", "libx264")
  write_video(d / "c.webm", "libvpx")
  return d


@pytest.fixture(scope="module")
def encoded(videos, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("encode"))
  return codec_mode.encode_main(tiny_config(videos), workdir)


def test_encode_writes_the_clips_the_vae_gives(videos, encoded):
  source = latent_clips.LatentSource(encoded)
  assert len(source) == 3
  codec = load_streaming_vae(VAE_DIR)
  cfg = video_folder.make_config(videos, num_frames=13, height=32, width=32, fps=SRC_FPS)
  for i in range(len(source)):
    record = source.example(i)
    name = record["file"].decode() if isinstance(record["file"], bytes) else record["file"]
    clips = list(video_folder.iter_clips(str(videos / name), cfg))
    assert len(clips) == 1
    want = np.asarray(codec.encode(latent_clips.to_unit_range(clips[0][2])[None]))[0]
    assert source[i].shape == (LATENTS, 4, 4, 4)
    np.testing.assert_allclose(source[i], want, atol=1e-5, rtol=1e-5)


def test_encode_on_the_mesh_equals_one_device(videos):
  """The batch sharded over 8 fake devices (data=2, fsdp=4) encodes as one device does."""
  codec = load_streaming_vae(VAE_DIR)
  cfg = video_folder.make_config(videos, num_frames=13, height=32, width=32, fps=SRC_FPS)
  clips = [latent_clips.to_unit_range(c[2]) for name in ("a.mp4", "b.mp4", "c.webm")
           for c in video_folder.iter_clips(str(videos / name), cfg)]
  batch = np.stack(clips * 3)[:8]
  want = np.asarray(codec.encode(batch))
  mesh_cfg = tiny_config().mesh
  mesh_cfg.data, mesh_cfg.fsdp = 2, 4
  mesh = sharding_lib.make_mesh(mesh_cfg)
  encoder = codec_mode.MeshEncoder(load_streaming_vae(VAE_DIR), mesh)
  spec = sharding_lib.batch_spec(encoder.rules, mesh, batch.shape)
  assert spec[0] == ("data", "fsdp")
  got = encoder.encode(batch)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_training_reads_the_latent_clips(encoded):
  config = tiny_config(latents_dir=encoded)
  data = inputs_lib.make_train_inputs(config)
  assert data.latents and data.example_shape == (LATENTS, 4, 4, 4)
  model = jax.eval_shape(lambda: CausalDiT(config.model, rngs=nnx.Rngs(0)))
  data.check_model(model)
  batch = next(data.iterator())
  assert set(batch) == {"video"} and batch["video"].shape == (2, LATENTS, 4, 4, 4)
  stored = {latent_clips.LatentSource(encoded)[i].tobytes() for i in range(3)}
  assert all(clip.tobytes() in stored for clip in batch["video"])  # as stored, not rescaled


def test_training_refuses_latents_of_another_shape(encoded):
  config = tiny_config(latents_dir=encoded)
  config.data.frame_size = (8, 8)
  with pytest.raises(UserError, match=r"data.frame_size=\(8, 8\)"):
    inputs_lib.make_train_inputs(config)


@pytest.mark.parametrize("chunk", [1, 3])
def test_decode_streams_1_plus_4_t_minus_1_frames(encoded, tmp_path, chunk):
  config = tiny_config()
  config.codec.latents = encoded
  config.codec.index = 1
  config.codec.chunk_latents = chunk
  out = codec_mode.decode_main(config, str(tmp_path))
  assert out.endswith("decoded/train_00001.mp4")
  frames = read_video(out)
  assert frames.shape == (1 + 4 * (LATENTS - 1), 32, 32, 3)
  whole = load_streaming_vae(VAE_DIR).decode(latent_clips.LatentSource(encoded)[1][None])[0]
  want = np.clip((np.asarray(whole) + 1) * 127.5 + 0.5, 0, 255)
  assert np.abs(frames.astype(np.float32) - want).mean() < 8  # lossy H.264 of the same frames
  with pytest.raises(UserError, match="exists"):  # never overwritten
    codec_mode.decode_main(config, str(tmp_path))


def test_decode_npy_and_bad_inputs(encoded, tmp_path):
  config = tiny_config()
  npy = tmp_path / "clip.npy"
  np.save(npy, latent_clips.LatentSource(encoded)[0][None])
  config.codec.latents = str(npy)
  assert read_video(codec_mode.decode_main(config, str(tmp_path))).shape[0] == 13
  for value, fragment in ((None, "needs --config.codec.latents"),
                          (str(tmp_path / "missing.npy"), "does not exist")):
    config.codec.latents = value
    with pytest.raises(UserError, match=fragment):
      codec_mode.decode_main(config, str(tmp_path))
  np.save(tmp_path / "wrong.npy", np.zeros((3, 4, 4, 7), np.float32))
  config.codec.latents = str(tmp_path / "wrong.npy")
  with pytest.raises(UserError, match=r"expected normalised latents \[t, h, w, 4\]"):
    codec_mode.decode_main(config, str(tmp_path))
  config.codec.latents = encoded
  config.codec.index = 9
  with pytest.raises(UserError, match="outside the 3 clips"):
    codec_mode.decode_main(config, str(tmp_path))
  assert not any(p.name.endswith(".partial.mp4") for p in (tmp_path / "decoded").iterdir())


def test_encode_errors(tmp_path):
  with pytest.raises(UserError, match="needs --config.data.folder"):
    codec_mode.encode_main(tiny_config(), str(tmp_path))
  with pytest.raises(UserError, match="no .*files"):
    (tmp_path / "empty").mkdir()
    codec_mode.encode_main(tiny_config(tmp_path / "empty"), str(tmp_path))
