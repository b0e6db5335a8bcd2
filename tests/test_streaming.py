"""ChunkRunner (benchmark and eval) reproduces the streaming sampler; feeding frames = context pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_config
from hybrid_video.run_info import blas_threads_limit
from hybrid_video.streaming import ChunkRunner, StreamingSampler
from tests.helpers import tiny_model

HW = 16


@pytest.fixture(autouse=True)
def _one_blas_thread():
  with blas_threads_limit(1):  # OpenBLAS threads stall the GDN triangular solve on a busy CPU
    yield


def _scfg():
  scfg = get_config().sampler
  scfg.cache_chunks = 2
  scfg.timesteps = (1000, 500)
  scfg.num_steps = 2  # euler passes per chunk: the equalities hold for any number
  return scfg


@pytest.mark.slow  # four compiles: ~20 s on an idle 2-core CPU
def test_generate_equals_the_streaming_sampler_and_grows_like_it():
  model = tiny_model(0.5, num_layers=2)  # one hybrid, one softmax layer
  cond = jnp.array([[3]])
  ref = []
  stats = StreamingSampler(model, _scfg(), batch=1, frame_hw=(HW, HW)).stream(
      6, cond, seed=7, progress=False, on_frames=ref.append)
  runner = ChunkRunner(model, _scfg(), batch=1, frame_hw=(HW, HW))
  assert runner.capacities(3) == [2, 4] and runner.capacities(9) == [2, 4, 8, 16]
  context = runner.embed(cond)
  carry, key, out = runner.init_carry(), jax.random.key(7), []
  for n in range(3):
    carry = runner.reserve(carry, n)
    carry, frames = runner.generate(carry, key, context)
    out.append(np.asarray(frames))
  np.testing.assert_allclose(np.concatenate(out, 1), np.concatenate(ref, 1), atol=1e-6)
  assert runner.compiles == stats.compiles == 2


def test_feeding_generated_frames_reproduces_the_samplers_carry():
  model = tiny_model(0.5, num_layers=2)
  runner = ChunkRunner(model, _scfg(), batch=2, frame_hw=(HW, HW))
  context = runner.embed(jnp.array([[1], [2]]))
  key = jax.random.key(0)
  gen = runner.reserve(runner.init_carry(), 2)
  fed = runner.reserve(runner.init_carry(), 2)
  for _ in range(3):
    gen, frames = runner.generate(gen, key, context)
    fed = runner.feed(fed, frames, context)
  for a, b in zip(jax.tree.leaves(gen), jax.tree.leaves(fed)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  assert int(fed["chunk"]) == 3 and len(runner.feed_traces) == 1
