"""Streaming sampler: fixed carry for 100%-hybrid models, one compile, mp4 output, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_config
from hybrid_video.nn.model import abstract_model, carry_bytes, count_params
from hybrid_video.streaming import StreamingSampler
from hybrid_video.video_io import Mp4Writer, read_video, to_uint8
from tests.helpers import tiny_model

HW = 16


def _sampler(ratio, **sampler_overrides):
  scfg = get_config().sampler
  scfg.cache_chunks = 2
  scfg.num_steps = 2  # the structure under test does not depend on the passes per chunk
  for k, v in sampler_overrides.items():
    setattr(scfg, k, v)
  return StreamingSampler(tiny_model(ratio), scfg, batch=1, frame_hw=(HW, HW))


def test_hybrid100_constant_carry_and_one_compile():
  sampler = _sampler(1.0)
  shapes = []
  carry = sampler.init_carry()
  stats = sampler.stream(100, jnp.array([[4]]), progress=False,
                         on_frames=lambda f: shapes.append(f.shape))
  assert stats.num_chunks == 50
  assert stats.compiles == 1
  assert len(set(stats.carry_bytes)) == 1
  assert stats.carry_bytes[0] == carry_bytes(carry)
  assert all(s == (1, 2, HW, HW, 1) for s in shapes)


@pytest.mark.slow
def test_softmax_cache_grows_by_doubling_and_bounded_cache_is_constant():
  unbounded = _sampler(0.0).stream(10, jnp.array([[1]]), progress=False)
  # 5 chunks with 2 initial slots: capacities 2, 4, 8 -> three compiles, growing carry.
  assert unbounded.compiles == 3
  assert unbounded.carry_bytes[-1] > unbounded.carry_bytes[0]
  bounded_sampler = _sampler(0.0)
  bounded_sampler.model.sink_chunks, bounded_sampler.model.window_chunks = 1, 2
  bounded = StreamingSampler(bounded_sampler.model, bounded_sampler.scfg, batch=1,
                             frame_hw=(HW, HW)).stream(12, jnp.array([[1]]), progress=False)
  assert bounded.compiles == 1
  assert len(set(bounded.carry_bytes)) == 1


@pytest.mark.slow
def test_bounded_cache_with_room_for_everything_equals_unbounded():
  frames = {}
  for name, (sinks, window) in {"unbounded": (0, 0), "bounded": (1, 8)}.items():
    sampler = _sampler(0.5, cache_chunks=8)
    sampler.model.sink_chunks, sampler.model.window_chunks = sinks, window
    sampler = StreamingSampler(sampler.model, sampler.scfg, batch=1, frame_hw=(HW, HW))
    out = []
    sampler.stream(8, jnp.array([[2]]), progress=False, on_frames=out.append)
    frames[name] = np.concatenate(out, axis=1)
  np.testing.assert_allclose(frames["bounded"], frames["unbounded"], atol=1e-5)


def test_euler_sampler_and_odd_frame_count_to_mp4(tmp_path):
  sampler = _sampler(0.75, kind="euler", num_steps=3)
  path = str(tmp_path / "video.mp4")
  with Mp4Writer(path, fps=8, upscale=2) as writer:
    stats = sampler.stream(7, jnp.array([[5]]), progress=False,
                           on_frames=lambda f: writer.write(to_uint8(f[0])))
  assert stats.num_chunks == 4 and writer.frames_written == 7
  video = read_video(path)
  assert video.shape == (7, 2 * HW, 2 * HW, 3)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_num_frames(bad):
  with pytest.raises(ValueError, match="num_frames"):
    _sampler(1.0).stream(bad, jnp.array([[1]]), progress=False)


@pytest.mark.slow
def test_wan_sized_config_builds_abstractly():
  cfg = get_config("wan1_3b")
  model = abstract_model(cfg.model)
  leaves = jax.tree.leaves(model)
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  n = count_params(model)
  assert 1.3e9 * 0.98 <= n <= 1.42e9 * 1.02, n
  block = model.blocks[0]
  assert block.self_attn.num_heads == 12 and block.self_attn.head_dim == 128
  assert block.ffn.fc1.kernel.shape == (1536, 8960)
  assert len(model.hybrid_layers) == round(0.75 * 30)
