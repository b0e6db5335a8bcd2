"""The main job end to end: training, resume, checkpoints, sampling and user errors."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs.default import get_config
from hybrid_video import train as train_lib
from hybrid_video.errors import UserError
from hybrid_video.modes import train as train_mode
from hybrid_video.video_io import read_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(data_dir, **train):
  """The smoke config without its wall-clock bound: a busy CI machine must not cut runs short."""
  cfg = get_config("smoke")
  cfg.data.dir = str(data_dir)
  cfg.train.max_minutes = 0
  for k, v in train.items():
    setattr(cfg.train, k, v)
  return cfg


def run_main(*args, timeout=300):
  # --config=FILE must come before any --config.x override (ml_collections).
  return subprocess.run([sys.executable, "main.py", *args, "--config.progress=false"], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  """A smoke workdir with checkpoints at steps 2 and 4."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  cfg = smoke_config(data_dir, num_steps=4, checkpoint_every=2, final_sample=False)
  summary = train_mode.train_main(cfg, workdir)
  assert summary["step"] == 4
  return workdir, cfg


def _params(state):
  return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def test_model_guidance_needs_label_dropout(tmp_path, data_dir):
  """train.model_guidance guides against the null label, which only dropped labels train."""
  cfg = smoke_config(data_dir, model_guidance=0.75, label_dropout=0.0)
  with pytest.raises(UserError, match="train.model_guidance=0.75 needs train.label_dropout"):
    train_lib.Trainer(cfg, str(tmp_path))


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path, data_dir):
  straight = train_lib.Trainer(smoke_config(data_dir, num_steps=3), str(tmp_path / "a"))
  straight.run(progress=False)
  first = train_lib.Trainer(smoke_config(data_dir, num_steps=1), str(tmp_path / "b"))
  first.run(progress=False)
  first.checkpointer.close()
  resumed = train_lib.Trainer(smoke_config(data_dir, num_steps=3), str(tmp_path / "b"))
  summary = resumed.run(progress=False)
  assert summary["start_step"] == 1 and summary["step"] == 3
  for a, b in zip(_params(straight.state), _params(resumed.state)):
    np.testing.assert_array_equal(a, b)
  assert int(resumed.state["step"]) == 3
  assert os.path.exists(os.path.join(tmp_path, "b", "metrics", "metrics.jsonl"))


@pytest.mark.slow
def test_smoke_main_job_end_to_end(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  r = run_main("--config=configs/default.py:smoke", f"--workdir={workdir}",
               f"--config.data.dir={data_dir}", "--config.sampler.num_frames=18",
               "--config.train.max_minutes=0")  # all 30 steps, however busy the machine
  assert r.returncode == 0, r.stderr[-3000:]
  path = os.path.join(workdir, "samples", "final_step_0000030.mp4")
  assert f"video: {path}" in r.stdout
  video = read_video(path)
  assert video.shape[0] == 18
  assert video.shape[1:] == (64, 64, 3)  # 16x16 canvas, upscaled 4x
  events = [f for f in os.listdir(os.path.join(workdir, "metrics")) if "tfevents" in f]
  assert events
  # The main job's three figures, printed and written beside the video.
  assert "  digits: label " in r.stdout and "centre moves <= 3 px" in r.stdout
  with open(path[:-len(".mp4")] + "_digits.json") as f:
    digits = json.load(f)
  assert len(digits["predicted"]) == 18 and 0 <= digits["single_digit_rate"] <= 1
  # --mode=sample restores the latest checkpoint and streams a chosen length.
  r = run_main("--mode=sample", "--config=configs/default.py:smoke", f"--workdir={workdir}",
               f"--config.data.dir={data_dir}", "--config.sampler.num_frames=9")
  assert r.returncode == 0, r.stderr[-3000:]
  assert read_video(os.path.join(workdir, "samples", "sample_step_0000030_9f.mp4")).shape[0] == 9
  assert "digits (read back from the mp4): label " in r.stdout  # its three figures too
  with open(os.path.join(workdir, "samples", "sample_step_0000030_9f_digits.json")) as f:
    assert len(json.load(f)["predicted"]) == 9
  # Another seed without sampler.output gets its own stream, not seed 0's to resume (refused).
  seed0 = read_video(os.path.join(workdir, "samples", "sample_step_0000030_9f.mp4"))
  r = run_main("--mode=sample", "--config=configs/default.py:smoke", f"--workdir={workdir}",
               f"--config.data.dir={data_dir}", "--config.sampler.num_frames=9",
               "--config.sampler.seed=1")
  assert r.returncode == 0, r.stderr[-3000:]
  seed1 = read_video(os.path.join(workdir, "samples", "sample_step_0000030_9f_seed1.mp4"))
  assert seed1.shape[0] == 9 and not np.array_equal(seed1, seed0)
  np.testing.assert_array_equal(
      read_video(os.path.join(workdir, "samples", "sample_step_0000030_9f.mp4")), seed0)


def _assert_one_line_error(r, *fragments):
  assert r.returncode != 0
  err = r.stderr.strip()
  assert "Traceback" not in err, err
  last = err.splitlines()[-1]
  assert last.startswith("error: "), err
  for fragment in fragments:
    assert fragment in last, last


def test_error_unknown_config_field(tmp_path):
  r = run_main(f"--workdir={tmp_path}", "--config.model.no_such_field=3")
  _assert_one_line_error(r, "unknown config field", "no_such_field")


@pytest.mark.parametrize("flag,fragment", [
    ("--mode=dance", "--mode=dance"),
    ("--config.train.num_steps=many", "num_steps"),
    ("--config=configs/default.py:nope", "unknown config variant"),
])
def test_error_bad_flag_value(tmp_path, flag, fragment):
  _assert_one_line_error(run_main(f"--workdir={tmp_path}", flag), fragment)


@pytest.mark.parametrize("make_folder", [False, True], ids=["missing", "empty"])
def test_error_data_folder(tmp_path, make_folder):
  folder = tmp_path / "videos"
  if make_folder:
    folder.mkdir()
  r = run_main("--config=configs/default.py:smoke", f"--workdir={tmp_path / 'w'}",
               "--config.data.source=video_folder", f"--config.data.folder={folder}",
               f"--config.data.dir={tmp_path / 'tfds'}", "--config.model.cond=none")
  _assert_one_line_error(r, str(folder))


def test_error_corrupt_checkpoint_keeps_older_one(tmp_path, trained, data_dir):
  workdir = str(tmp_path / "w")
  shutil.copytree(trained[0], workdir)
  state_dir = os.path.join(workdir, "checkpoints", "4", "state")
  for root, _, files in os.walk(state_dir):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"\0garbage")
  r = run_main("--config=configs/default.py:smoke", f"--workdir={workdir}",
               f"--config.data.dir={data_dir}", "--config.train.num_steps=6")
  _assert_one_line_error(r, "step 4", "corrupt", "resume_step=2")
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))


def test_error_incompatible_config_names_fields(tmp_path, trained, data_dir):
  workdir = str(tmp_path / "w")
  shutil.copytree(trained[0], workdir)
  r = run_main("--config=configs/default.py:smoke", f"--workdir={workdir}",
               f"--config.data.dir={data_dir}", "--config.model.dim=64",
               "--config.model.num_heads=4")
  _assert_one_line_error(r, "incompatible config", "model.dim: 48 -> 64", "model.num_heads")


def test_error_non_finite_loss_names_step(tmp_path, data_dir):
  r = run_main("--config=configs/default.py:smoke", f"--workdir={tmp_path}",
               f"--config.data.dir={data_dir}", "--config.train.learning_rate=1e30",
               "--config.train.warmup_steps=0", "--config.train.grad_clip=1e30")
  _assert_one_line_error(r, "non-finite loss", "at step")


@pytest.mark.parametrize("args,fragments", [
    (["--config=configs/no_such_config.py"], ["cannot load --config", "no_such_config.py"]),
    (["--config.model.dtype=float16"], ["model.dtype='float16'", "'bfloat16'"]),
    (["--config.sampler.kind=ddim"], ["sampler.kind", "'euler'"]),
    (["--config.train.batch_size=0"], ["train.batch_size=0", "positive integer"]),
    (["--config.model.attention_impl=cuda"], ["model.attention_impl", "'pallas'"]),
], ids=["missing-config", "dtype", "sampler-kind", "batch-size", "attention-impl"])
def test_error_bad_config_value_before_anything_runs(tmp_path, args, fragments):
  workdir = tmp_path / "w"
  _assert_one_line_error(run_main(f"--workdir={workdir}", *args), *fragments)
  assert not workdir.exists()  # nothing was created


def test_error_workdir_is_a_file(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("keep me")
  _assert_one_line_error(run_main(f"--workdir={path}"), "not a directory")
  assert path.read_text() == "keep me"


def test_sample_refuses_model_override_naming_checkpoint_value(trained, data_dir):
  workdir, _ = trained
  before = sorted(os.listdir(workdir))
  r = run_main("--mode=sample", "--config=configs/default.py:smoke", f"--workdir={workdir}",
               f"--config.data.dir={data_dir}", "--config.model.dim=64")
  _assert_one_line_error(r, "--config.model.dim=64", "trained with model.dim=48")
  assert sorted(os.listdir(workdir)) == before


@pytest.mark.slow
def test_sample_is_bit_reproducible_across_processes(tmp_path, trained, data_dir):
  """Two processes running the same --mode=sample command at the same time write the same
  pixels (issue: the first chunks used to differ between runs)."""
  workdirs = [str(tmp_path / name) for name in ("a", "b")]
  for w in workdirs:
    shutil.copytree(trained[0], w)
  procs = [subprocess.Popen(
      [sys.executable, "main.py", "--mode=sample", "--config=configs/default.py:smoke",
       "--config.progress=false", f"--workdir={w}", f"--config.data.dir={data_dir}",
       "--config.sampler.num_steps=16", "--config.sampler.num_frames=24"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in workdirs]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  videos = [read_video(os.path.join(w, "samples", "sample_step_0000004_24f.mp4"))
            for w in workdirs]
  assert videos[0].shape[0] == 24
  np.testing.assert_array_equal(videos[0], videos[1])


def test_training_logs_per_head_retention(trained):
  """Method doc §8: exp(sum of g over a chunk) per hybrid layer and head is logged in training."""
  with open(os.path.join(trained[0], "metrics", "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  keys = set().union(*rows)
  assert {"layer0/retention_mean", "layer0/retention_h0", "layer0/retention_h1"} <= keys, keys
  values = [r["layer0/retention_mean"] for r in rows if "layer0/retention_mean" in r]
  assert values and all(0.0 < v <= 1.0 for v in values)
