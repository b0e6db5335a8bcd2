"""The text-to-video command end to end on CPU, with tiny random weights in the real on-disk
layouts (diffusers folder: transformer/, vae/, text_encoder/, tokenizer/): --mode=import, then
--mode=sample with a prompt, a prompt file and a prompt switch; bad input gets one line and
writes no video."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hybrid_video.video_io import read_video

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def run_main(*args, timeout=600):
  return subprocess.run([sys.executable, "main.py", "--config=configs/wan.py:tiny_t2v",
                         "--config.progress=false", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)


def _one_line_error(r, *fragments):
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert "Traceback" not in r.stderr and last.startswith("error: "), r.stderr[-2000:]
  for f in fragments:
    assert f in last, last


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """A diffusers-style weights folder assembled from the fixtures (no file stored twice)."""
  root = tmp_path_factory.mktemp("weights")
  for name, src in (("transformer", "t2v/transformer"), ("vae", "vae/diffusers"),
                    ("text_encoder", "umt5/hf"), ("tokenizer", "umt5/tokenizer")):
    os.symlink(os.path.join(FIXTURES, src), root / name)
  return root


@pytest.fixture(scope="module")
def imported(tmp_path_factory, weights):
  workdir = tmp_path_factory.mktemp("run")
  r = run_main("--mode=import", f"--workdir={workdir}", f"--config.weights.path={weights}")
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir


def _sample(workdir, weights, *args):
  return run_main("--mode=sample", f"--workdir={workdir}", f"--config.t2v.weights_dir={weights}",
                  "--config.sampler.num_frames=13", *args)


@pytest.mark.slow
def test_prompt_to_mp4_cache_seed_and_switch(imported, weights):
  r = _sample(imported, weights, "--config.t2v.prompt=a cat walks on the grass")
  assert r.returncode == 0, r.stderr[-3000:]
  path = os.path.join(imported, "samples", "t2v_000_seed0.mp4")
  first = read_video(path)
  assert first.shape == (13, 32, 32, 3)       # F=2 latents: 5 frames, then 8 per chunk
  with open(path[:-4] + ".json") as f:
    record = json.load(f)
  assert record["prompt"] == "a cat walks on the grass" and record["seed"] == 0
  assert record["prompt_cache_hits"] == 0 and "stream_seconds" in record["timings"]
  # Again: the same frames, and the encoder is not run (the prompt cache is hit).
  r = _sample(imported, weights, "--config.t2v.prompt=a cat walks on the grass")
  assert r.returncode == 0, r.stderr[-3000:]
  np.testing.assert_array_equal(read_video(path), first)
  with open(path[:-4] + ".json") as f:
    assert json.load(f)["prompt_cache_hits"] == 1
  # A switch at frame 5 (chunk 1): frames 0..4 unchanged, the rest changed.
  r = _sample(imported, weights,
              '--config.t2v.prompt=0:"a cat walks on the grass" 5:"a red car at night"')
  assert r.returncode == 0, r.stderr[-3000:]
  switched = read_video(path)
  np.testing.assert_array_equal(switched[:5], first[:5])
  assert np.abs(switched[5:].astype(int) - first[5:].astype(int)).max() > 0


@pytest.mark.slow
def test_prompt_file_gives_one_video_per_line(imported, weights, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a cat walks\n\n# a comment\na dog runs\n")
  r = _sample(imported, weights, f"--config.t2v.prompt_file={prompts}",
              "--config.sampler.seed=7")
  assert r.returncode == 0, r.stderr[-3000:]
  for i, seed in ((0, 7), (1, 8)):
    assert read_video(os.path.join(imported, "samples", f"t2v_{i:03d}_seed{seed}.mp4")).shape[0] == 13


@pytest.mark.parametrize("case", ["empty_prompt_file", "missing_folder", "missing_part",
                                  "vocab_mismatch"])
def test_bad_input_one_line_and_no_video(imported, weights, tmp_path, case):
  args = []
  folder = weights
  if case == "empty_prompt_file":
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    args, fragment = [f"--config.t2v.prompt_file={empty}"], "no prompt"
  elif case == "missing_folder":
    folder, fragment = tmp_path / "nowhere", "does not exist"
  elif case == "missing_part":
    folder = tmp_path / "partial"
    folder.mkdir()
    for name in ("transformer", "text_encoder", "tokenizer"):
      os.symlink(os.path.realpath(weights / name), folder / name)
    fragment = "has no vae"
  else:  # a tokenizer whose vocabulary exceeds the encoder's: point it at a bigger config
    folder = tmp_path / "mismatch"
    folder.mkdir()
    for name in ("transformer", "vae", "tokenizer"):
      os.symlink(os.path.realpath(weights / name), folder / name)
    (folder / "text_encoder").mkdir()
    enc = os.path.realpath(weights / "text_encoder")
    for f in os.listdir(enc):
      if f != "config.json":
        os.symlink(os.path.join(enc, f), folder / "text_encoder" / f)
    with open(os.path.join(enc, "config.json")) as f:
      cfg = json.load(f)
    cfg["vocab_size"] = 100
    (folder / "text_encoder" / "config.json").write_text(json.dumps(cfg))
    fragment = "vocab"
  before = sorted(os.listdir(os.path.join(imported, "samples"))) if os.path.isdir(
      os.path.join(imported, "samples")) else []
  if not args:
    args = ["--config.t2v.prompt=a cat"]
  r = _sample(imported, folder, *args)
  _one_line_error(r, fragment)
  after = sorted(os.listdir(os.path.join(imported, "samples"))) if os.path.isdir(
      os.path.join(imported, "samples")) else []
  assert [f for f in after if f.endswith(".mp4")] == [f for f in before if f.endswith(".mp4")]
