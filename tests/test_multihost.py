"""Several processes: two local processes (jax.distributed on localhost, CPU collectives) train,
checkpoint, resume and sample as README's multi-host command does, and end with the parameters of
a single-process run on the same global batches (4 devices in both)."""

import os
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest
from flax import nnx

from configs.default import get_config
from hybrid_video.restore import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _args(workdir, data_dir, steps: int):
  return [sys.executable, "main.py", "--config=configs/default.py:smoke",
          f"--workdir={workdir}", f"--config.data.dir={data_dir}", "--config.progress=false",
          f"--config.train.num_steps={steps}", "--config.train.max_minutes=0",
          "--config.train.checkpoint_every=2", "--config.sampler.num_frames=4"]


def _two_processes(args, timeout=900):
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(args + ["--distributed", f"--coordinator_address=127.0.0.1:{port}",
                                    "--num_processes=2", f"--process_id={i}"],
                            cwd=ROOT, env=_env(2), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=timeout) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def _params(workdir, data_dir):
  cfg = get_config("smoke")
  cfg.data.dir = str(data_dir)
  model, _, step = load_model(cfg, str(workdir))
  return step, [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.mark.slow
def test_two_processes_train_resume_and_sample_like_one(tmp_path):
  data_dir = tmp_path / "tfds"
  single, multi = tmp_path / "single", tmp_path / "multi"
  r = subprocess.run(_args(single, data_dir, 3), cwd=ROOT, env=_env(4), capture_output=True,
                     text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  outs = _two_processes(_args(multi, data_dir, 2))           # trains 2 steps, saves
  assert "video:" in outs[0][0]                               # process 0 wrote the video
  _two_processes(_args(multi, data_dir, 3))                   # resumes at 2, trains to 3
  assert os.path.exists(multi / "samples" / "final_step_0000003.mp4")
  step_a, a = _params(single, data_dir)
  step_b, b = _params(multi, data_dir)
  assert step_a == step_b == 3
  for x, y in zip(a, b):
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)
