"""Resumable streams (issue 18): killed streams resume to the same video, forks share their
parent's prefix, corrupt or foreign stream checkpoints are refused in one line, and a carry
saved on one mesh restores on another."""

import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs.default import get_config
from hybrid_video import checkpoint as ckpt_lib
from hybrid_video import sharding as sharding_lib
from hybrid_video import stream_state
from hybrid_video import video_segments
from hybrid_video.errors import CheckpointError, UserError
from hybrid_video.modes import sample
from hybrid_video.nn.model import CausalDiT, abstract_model
from hybrid_video.optim import make_optimizer
from hybrid_video.streaming import StreamingSampler
from hybrid_video.train_state import abstract_train_state
from hybrid_video.video_io import read_video
from tests.helpers import rel_err, tiny_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_FRAMES = 48  # 24 chunks of 2 frames
EVERY = 2        # a stream checkpoint every 2 chunks
VARIANTS = {"arl2": (0.75, 4), "hybrid100": (1.0, 2)}  # model.hybrid.ratio, num_layers


def _overrides(data_dir, **extra):
  """The command's config: the smoke model (the checkpoint fixes its layers), 1 Euler step."""
  out = {"sampler.num_steps": 1, "sampler.num_frames": NUM_FRAMES,
         "sampler.checkpoint_every": EVERY, "progress": False, "data.dir": str(data_dir)}
  out.update(extra)
  return out


def _config(overrides):
  cfg = get_config("smoke")
  for dotted, value in overrides.items():
    *path, last = dotted.split(".")
    node = cfg
    for p in path:
      node = node[p]
    node[last] = value
  return cfg


def _command(workdir, overrides):
  args = [f"--config.{k}={v}" for k, v in overrides.items()]
  return [sys.executable, "main.py", "--mode=sample", "--config=configs/default.py:smoke",
          f"--workdir={workdir}", *args]


def _env(cache_dir):
  # The subprocesses share compiled executables (each kill/resume cycle skips the XLA compile)
  # and compile without LLVM optimisations (3x faster; the same in every run compared).
  return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
          "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"}


def _random(abstract, seed: int):
  """Random parameters for an abstract tree, drawn with numpy (no per-shape XLA compiles): the
  memory gates open (as tests/helpers.open_memory_gates) so frames depend on the carry."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if "w_gate" in name:
      x = np.full(s.shape, 0.05)
    elif "a_log" in name:
      x = np.full(s.shape, -3.0)
    elif "scale" in name:
      x = 1.0 + 0.1 * rng.standard_normal(s.shape)
    elif len(s.shape) >= 2 and "modulation" not in name:
      x = rng.standard_normal(s.shape) / np.sqrt(s.shape[0])
    else:
      x = 0.1 * rng.standard_normal(s.shape)
    return jnp.asarray(x.astype(s.dtype))
  return jax.tree_util.tree_map_with_path(fill, abstract)


def random_model(cfg, seed: int = 1) -> CausalDiT:
  graphdef, abstract = nnx.split(abstract_model(cfg))
  return nnx.merge(graphdef, _random(abstract, seed))


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  """{variant: workdir} holding a random smoke checkpoint with model.hybrid.ratio set (4
  layers: 3 hybrid + 1 softmax; 2 layers, all hybrid), saved the way the trainer saves it."""
  out = {}
  for name, (ratio, layers) in VARIANTS.items():
    workdir = str(tmp_path_factory.mktemp(name))
    cfg = _config({"model.num_layers": layers, "model.hybrid.ratio": ratio})
    _, state = abstract_train_state(cfg.model, make_optimizer(cfg.train))
    state = jax.tree.map(lambda s: jnp.asarray(np.zeros(s.shape, s.dtype)), state)
    state["params"] = state["ema"] = _random(state["params"], seed=1)
    ck = ckpt_lib.Checkpointer(workdir)
    ck.save(3, state, cfg, force=True)
    ck.wait()
    ck.close()
    out[name] = workdir
  return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")  # frame size only: the tiny data is never built


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def reference(workdirs, data_dir, cache_dir):
  """An uninterrupted run of the command per variant (both at once): {variant: (workdir,
  video path)}. It keeps every stream checkpoint (forks and the corruption test use them)."""
  keep_all = {"sampler.output": "ref", "sampler.keep_stream_checkpoints": 0}
  procs = {name: subprocess.Popen(_command(workdir, _overrides(data_dir, **keep_all)), cwd=ROOT,
                                  env=_env(cache_dir), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
           for name, workdir in workdirs.items()}
  out = {}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    path = os.path.join(workdirs[name], "samples", "ref.mp4")
    assert f"video: {path}" in stdout and "stream new" in stdout
    out[name] = (workdirs[name], path)
  return out


def _saved(stream_dir) -> list[int]:
  d = os.path.join(stream_dir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _assert_all_readable(stream_dir):
  """Every committed stream checkpoint restores completely (arrays and meta)."""
  manager = ocp.CheckpointManager(os.path.join(stream_dir, "checkpoints"),
                                  options=ocp.CheckpointManagerOptions(create=False),
                                  item_names=("carry", "meta"))
  for chunk in manager.all_steps():
    r = manager.restore(chunk, args=ocp.args.Composite(carry=ocp.args.StandardRestore(),
                                                       meta=ocp.args.JsonRestore()))
    assert int(r["carry"]["carry"]["chunk"]) == chunk == r["meta"]["chunk"]
  manager.close()


def _kill_and_resume(workdir, ref_path, data_dir, cache_dir, seed: int, kills: int = 3):
  """SIGKILL the command `kills` times at random points, rerun it to the end, and compare the
  video with the uninterrupted run's."""
  cmd = _command(workdir, _overrides(data_dir, **{"sampler.output": "killed"}))
  stream_dir = os.path.join(workdir, "samples", "killed.stream")
  rng = np.random.default_rng(seed)
  for kill in range(kills):
    # After 1-2 more saved checkpoints plus a random delay: mid-chunk, mid-save (the async
    # write, or orbax deleting an old checkpoint) or mid-segment, wherever that lands.
    target = (_saved(stream_dir) or [0])[-1] + EVERY * int(rng.integers(1, 3))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(cache_dir), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and (_saved(stream_dir) or [0])[-1] < target:
      assert time.monotonic() < deadline, "the stream made no progress"
      time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.02))
    assert proc.poll() is None, f"kill {kill}: the stream ended first: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    _assert_all_readable(stream_dir)
  latest = _saved(stream_dir)[-1]
  r = subprocess.run(cmd, cwd=ROOT, env=_env(cache_dir), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"stream resumed at chunk {latest};" in r.stdout  # the last save, not the beginning
  video, ref = read_video(os.path.join(workdir, "samples", "killed.mp4")), read_video(ref_path)
  assert video.shape[0] == NUM_FRAMES  # no duplicated or missing frames
  np.testing.assert_array_equal(video, ref)
  _assert_all_readable(stream_dir)
  assert not os.path.exists(os.path.join(stream_dir, "segments", ".open.mp4"))


@pytest.mark.slow
def test_killed_streams_resume_to_the_same_video(reference, data_dir, cache_dir):
  """Both variants at once (each drives its own processes), so two cores are used."""
  with ThreadPoolExecutor(len(VARIANTS)) as pool:
    futures = {name: pool.submit(_kill_and_resume, *reference[name], data_dir, cache_dir,
                                 seed=18 + i) for i, name in enumerate(VARIANTS)}
  for name, future in futures.items():
    try:
      future.result()
    except AssertionError as e:
      raise AssertionError(f"variant {name}: {e}") from e


@pytest.mark.slow  # needs the reference streams (two processes)
def test_fork_shares_the_prefix_and_differs_after(reference, data_dir, cache_dir):
  workdir, parent_path = reference["hybrid100"]
  k, f = 6, 2
  fork = {"sampler.fork_from": "ref", "sampler.fork_chunk": k, "sampler.seed": 1}
  r = subprocess.run(_command(workdir, _overrides(data_dir, **fork)), cwd=ROOT,
                     env=_env(cache_dir), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  parent_dir = os.path.join(workdir, "samples", "ref.stream")
  assert f"stream forked from {parent_dir} at chunk {k}" in r.stdout
  name = f"ref_fork{k}_seed1"
  fork_video, parent = read_video(os.path.join(workdir, "samples", name + ".mp4")), \
      read_video(parent_path)
  assert fork_video.shape == parent.shape
  np.testing.assert_array_equal(fork_video[:k * f], parent[:k * f])
  diff = np.abs(fork_video.astype(int) - parent.astype(int)).reshape(NUM_FRAMES, -1).max(axis=1)
  assert (diff[k * f:] > 0).all(), diff
  # The prefix is the parent's segments (linked), not regenerated.
  prefix = [p for a, b, p in video_segments.segments(
      os.path.join(workdir, "samples", name + ".stream", "segments")) if b <= k]
  assert len(prefix) == k // EVERY
  for p in prefix:
    assert os.path.samefile(p, os.path.join(parent_dir, "segments", os.path.basename(p)))
  # A fork with the parent's seed would only repeat it.
  cfg = _config(_overrides(data_dir, **{**fork, "sampler.seed": 0}))
  with pytest.raises(UserError, match="parent's seed"):
    sample.sample_main(cfg, workdir)


@pytest.mark.slow  # needs the reference streams (two processes)
def test_corrupt_stream_checkpoint_names_the_previous_good_one(reference, data_dir, tmp_path,
                                                              cache_dir):
  src, ref_path = reference["arl2"]
  workdir = str(tmp_path / "w")
  shutil.copytree(src, workdir)
  stream_dir = os.path.join(workdir, "samples", "ref.stream")
  chunks = _saved(stream_dir)
  latest, previous = chunks[-1], chunks[-2]
  for root, _, files in os.walk(os.path.join(stream_dir, "checkpoints", str(latest), "carry")):
    for name in files:  # truncate every array file
      p = os.path.join(root, name)
      with open(p, "r+b") as fh:
        fh.truncate(os.path.getsize(p) // 2)
  before = sorted(os.path.relpath(os.path.join(r, n), workdir)
                  for r, _, fs in os.walk(workdir) for n in fs)
  cfg = _config(_overrides(data_dir, **{"sampler.output": "ref",
                                       "sampler.keep_stream_checkpoints": 0}))
  with pytest.raises(CheckpointError) as e:
    sample.sample_main(cfg, workdir)
  message = str(e.value)
  assert "\n" not in message
  assert f"chunk {latest}" in message and "corrupt" in message
  assert f"--config.sampler.resume_chunk={previous}" in message
  after = sorted(os.path.relpath(os.path.join(r, n), workdir) for r, _, fs in os.walk(workdir)
                 for n in fs)
  assert after == before  # nothing deleted
  # Following the hint finishes the video; the corrupt checkpoint is set aside, not deleted.
  overrides = _overrides(data_dir, **{"sampler.output": "ref", "sampler.resume_chunk": previous})
  r = subprocess.run(_command(workdir, overrides), cwd=ROOT, env=_env(cache_dir),
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"stream resumed at chunk {previous};" in r.stdout
  assert os.path.isdir(os.path.join(stream_dir, "discarded", str(latest), "carry"))
  np.testing.assert_array_equal(read_video(os.path.join(workdir, "samples", "ref.mp4")),
                                read_video(ref_path))


@pytest.mark.slow  # needs the reference streams (two processes)
def test_another_config_is_refused_naming_the_difference(reference, data_dir):
  workdir, _ = reference["hybrid100"]
  cfg = _config(_overrides(data_dir, **{"sampler.output": "ref", "sampler.num_steps": 3}))
  with pytest.raises(CheckpointError, match=r"sampler\.num_steps: 1 -> 3") as e:
    sample.sample_main(cfg, workdir)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("field,value,fragment", [
    ("sampler.checkpoint_every", -1, "checkpoint_every"),
    ("sampler.output", "a/b", "sampler.output"),
    ("sampler.fork_from", "nope", "no stream checkpoints"),
])
def test_bad_input_is_one_user_error(workdirs, data_dir, field, value, fragment):
  cfg = _config(_overrides(data_dir, **{field: value}))
  with pytest.raises(UserError, match=fragment) as e:
    sample.sample_main(cfg, workdirs["hybrid100"])
  assert "\n" not in str(e.value)


def _mesh(**sizes):
  cfg = get_config().mesh
  for name in sharding_lib.MESH_AXES:
    cfg[name] = sizes.get(name, 1)
  n = int(np.prod(list(sizes.values())))
  return sharding_lib.make_mesh(cfg, devices=jax.devices()[:n])


@pytest.mark.slow  # two compiles of the sampler step
def test_two_device_save_restores_on_one_and_on_four_devices(tmp_path):
  model = random_model(tiny_model_config(0.5, num_layers=2))  # GDN state and a K/V cache
  scfg = get_config().sampler
  scfg.cache_chunks, scfg.num_steps = 4, 1
  cond = jnp.array([[3]])
  one = StreamingSampler(model, scfg, batch=1, frame_hw=(16, 16))
  key, context = one.prepare(5, cond)
  carry = jax.device_put(one.init_carry(), jax.devices()[0])  # committed: one executable
  for _, carry, _ in one.chunks(carry, key, context, 3):
    pass
  two, rules = _mesh(tensor=2), dict(sharding_lib.DEFAULT_RULES)
  on_two = jax.device_put(carry, sharding_lib.named(two, sharding_lib.carry_specs(carry, rules,
                                                                                  two)))
  state = next(lc["state"] for lc in on_two["layers"] if "state" in lc)
  assert state.sharding.spec[1] == "tensor"  # saved as shards of two devices
  ckpt = stream_state.StreamCheckpointer(str(tmp_path / "s.stream"))
  ckpt.save(3, on_two, key, {"fingerprint": {}, "chunk": 3})
  ckpt.wait()
  saved = jax.tree.map(np.asarray, carry)
  (_, _, reference), = one.chunks(carry, key, context, 4)  # chunk 3, uninterrupted
  for mesh in (None, _mesh(tensor=2, context=2)):
    runner = one if mesh is None else StreamingSampler(model, scfg, batch=1, frame_hw=(16, 16),
                                                       mesh=mesh)
    carry, key = ckpt.restore(3, stream_state.abstract_carry(model, 1, (16, 16), 4, mesh))
    for a, b in zip(jax.tree.leaves(carry), jax.tree.leaves(saved)):
      np.testing.assert_array_equal(np.asarray(a), b)
    if mesh is not None:
      state = next(lc["state"] for lc in carry["layers"] if "state" in lc)
      cache = next(lc["k"] for lc in carry["layers"] if "k" in lc)
      assert state.sharding.spec[1] == "tensor" and cache.sharding.spec[1] == "context"
    (_, _, frames), = runner.chunks(carry, key, runner.embed(cond), 4)
    if mesh is None:  # the same executable on the same device: bit for bit
      np.testing.assert_array_equal(np.asarray(frames), np.asarray(reference))
    assert rel_err(frames, reference) <= 1e-5
  ckpt.close()
