"""--mode=eval: metrics on known answers, the digit classifier, checkpoint restore, end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs.default import get_config
from data import moving_digits
from hybrid_video import checkpoint as ckpt_lib
from data import digit_metrics
from hybrid_video import video_metrics
from hybrid_video.modes import evaluate
from hybrid_video.optim import make_optimizer
from hybrid_video.train_state import init_train_state
from hybrid_video.errors import UserError
from hybrid_video.nn.model import CausalDiT
from hybrid_video.restore import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ground_truth(num_videos=3, frames=12, config="default", num_digits=1):
  """GroundTruth of generated test examples, without building the tfds dataset."""
  cfg = moving_digits.make_config(base=config, num_digits=num_digits)
  videos, tops, labels, templates = [], [], [], []
  for i in range(num_videos):
    ex = moving_digits.generate_example(cfg, "test", i)
    video, pos = moving_digits.render_clip(
        moving_digits.digit_images_for(ex["source_index"], cfg.digit_size), ex["start"],
        ex["velocity"], frames, cfg.canvas_size, cfg.digit_size)
    videos.append(video)
    tops.append(moving_digits.pixel_positions(pos, cfg.canvas_size, cfg.digit_size))
    labels.append(ex["labels"])
    templates.append(moving_digits.digit_images_for(ex["source_index"], cfg.digit_size))
  return evaluate.GroundTruth(np.stack(videos), np.stack(tops), np.stack(labels),
                              np.stack(templates).astype(np.float32) / 255.0,
                              clip_frames=cfg.num_frames, digit_size=cfg.digit_size,
                              interpolation=cfg.interpolation)


def _metrics(generated, gt, radius=12):
  clf = digit_metrics.digit_classifier(gt.digit_size)
  m = evaluate.frame_metrics(generated, gt.frames01, gt.top_left, gt.templates, clf,
                             radius=radius, ink_threshold=0.25, psnr_cap=100.0)
  return m, evaluate.summarize(m, gt.labels, evaluate.bucket_edges(gt.video.shape[1], 8, (1,)))


@pytest.mark.parametrize("num_digits", [1, 2])
def test_ground_truth_against_itself_is_perfect(num_digits):
  gt = _ground_truth(num_digits=num_digits)
  m, s = _metrics(gt.frames01, gt)
  assert np.all(m["psnr"] == 100.0)
  np.testing.assert_allclose(m["ssim"], 1.0, atol=1e-12)
  assert m["retained"].all() and not m["lost"].any()
  np.testing.assert_array_equal(m["position_error"], 0.0)
  assert s["overall"]["retention"] == 1.0 and s["overall"]["position_error"] == 0.0
  assert [b["frames"] for b in s["buckets"]] == [[0, 8], [8, 12]]


def test_blank_video_scores_badly():
  gt = _ground_truth()
  blank = np.zeros_like(gt.frames01)
  m, s = _metrics(blank, gt, radius=12)
  assert np.all(m["psnr"] < 20.0)  # a black frame: only the digit pixels are wrong
  assert np.all(m["ssim"] < 0.8)  # the empty background still matches: SSIM is ~0.6, not 0
  assert not m["retained"].any() and (m["label_pred"] == -1).all()
  assert m["lost"].all()
  np.testing.assert_allclose(m["position_error"], 12 * np.sqrt(2.0))
  assert s["overall"]["label_accuracy"] == 0.0 and s["overall"]["lost"] == 1.0


def test_shifted_digit_gives_the_shift_as_position_error():
  gt = _ground_truth(num_videos=2, frames=4)
  shifted = np.zeros_like(gt.frames01)
  shifted[:, :, 1:, 2:] = gt.frames01[:, :, :-1, :-2]  # digit moved by (1, 2) pixels
  m, _ = _metrics(shifted, gt)
  ok = (gt.top_left[..., 0] < 32 - 12 - 1) & (gt.top_left[..., 1] < 32 - 12 - 2)  # still inside
  np.testing.assert_allclose(m["position_error"][ok], np.sqrt(5.0))
  assert 0 < m["ssim"].mean() < 1


def test_ssim_matches_a_direct_convolution():
  from scipy.signal import convolve2d  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  a = rng.random((32, 32))
  b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1)
  x = np.arange(11) - 5.0
  w = np.exp(-0.5 * (x / 1.5) ** 2)
  win = np.outer(w, w) / w.sum() ** 2
  f = lambda z: convolve2d(z, win, mode="valid")
  ma, mb = f(a), f(b)
  va, vb, cov = f(a * a) - ma ** 2, f(b * b) - mb ** 2, f(a * b) - ma * mb
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  want = np.mean((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
  assert video_metrics.ssim(a[..., None], b[..., None]) == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("digit_size", [12, 8])
def test_digit_classifier_reaches_95_percent_on_held_out_digits(digit_size):
  clf = digit_metrics.digit_classifier(digit_size)
  assert clf.test_accuracy >= 0.95
  assert clf.test_accuracy == clf.accuracy("test")  # the bundled digits' test split
  assert clf.predict(np.zeros((3, digit_size, digit_size))).tolist() == [-1, -1, -1]


def test_parse_eval_workdirs():
  entries = evaluate.parse_eval_workdirs(
      "teacher=runs/soft,runs/arl2,noisy=runs/arl2+memory.write_during_denoising=true", "w")
  assert [(e.label, e.workdir, e.overrides) for e in entries] == [
      ("teacher", "runs/soft", {}), ("arl2", "runs/arl2", {}),
      ("noisy", "runs/arl2", {"memory.write_during_denoising": True})]
  assert evaluate.parse_eval_workdirs(None, "runs/x/")[0].label == "x"
  with pytest.raises(UserError, match="unique"):
    evaluate.parse_eval_workdirs("a=x,a=y", "w")
  with pytest.raises(UserError, match="FIELD=VALUE"):
    evaluate.parse_eval_workdirs("a=x+oops", "w")


def test_bucket_edges():
  assert evaluate.bucket_edges(80, 8, (1, 2, 4, 10)) == [(0, 8), (8, 16), (16, 32), (32, 80)]
  assert evaluate.bucket_edges(20, 8, (1, 2, 4, 10)) == [(0, 8), (8, 16), (16, 20)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """An (untrained) smoke-config checkpoint saved the way the trainer saves it."""
  workdir = str(tmp_path_factory.mktemp("ckpt"))
  cfg = get_config("smoke")
  cfg.data.dir = str(tmp_path_factory.mktemp("tfds"))
  cfg.model.num_layers = 4  # ratio 0.75: layers 0-2 hybrid, layer 3 softmax
  state = init_train_state(CausalDiT(cfg.model, rngs=nnx.Rngs(0)),
                                     make_optimizer(cfg.train))
  ck = ckpt_lib.Checkpointer(workdir)
  ck.save(2, state, cfg, force=True)
  ck.wait()
  ck.close()
  return workdir, cfg, state


def test_load_model_takes_the_checkpoint_config_and_free_overrides(checkpoint):
  workdir, cfg, state = checkpoint
  current = get_config("smoke")  # 2 layers: the checkpoint's 4 must win
  model, config, step = load_model(current, workdir,
                                   model_overrides={"memory.write_during_denoising": True})
  assert step == 2 and len(model.blocks) == 4 and model.hybrid_layers == (0, 1, 2)
  assert config.model.memory.write_during_denoising
  np.testing.assert_array_equal(np.asarray(model.head_modulation[...]),
                                np.asarray(state["ema"]["head_modulation"][...]))
  with pytest.raises(UserError, match="shapes"):
    load_model(current, workdir, model_overrides={"dim": 8})


@pytest.mark.slow
def test_eval_mode_end_to_end(checkpoint, tmp_path):
  workdir, cfg, _ = checkpoint
  out = str(tmp_path / "eval_out")
  r = subprocess.run(
      [sys.executable, "main.py", "--mode=eval", "--config=configs/default.py:smoke",
       f"--workdir={out}", f"--config.data.dir={cfg.data.dir}", "--config.progress=false",
       "--config.eval.num_videos=3", "--config.eval.batch_size=2",
       "--config.eval.context_frames=2", "--config.eval.num_frames=10",
       "--config.eval.num_seeds=2", "--config.eval.condition=null",
       f"--config.eval.workdirs=arl2={workdir},noisy={workdir}+memory.write_during_denoising=true"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(out, "eval", "eval.json")) as f:
    res = json.load(f)
  assert list(res["entries"]) == ["arl2", "noisy"]
  assert res["entries"]["noisy"]["model"]["write_during_denoising"]
  assert res["num_frames"] == 10 and res["clip_frames"] == 4  # the tiny data's 4-frame clips
  assert sorted(res["baselines"]) == ["blank", "last_frame"]
  for e in list(res["entries"].values()) + list(res["baselines"].values()):
    assert len(e["per_frame"]["psnr"]) == 10
    assert [b["frames"] for b in e["buckets"]] == [[0, 4], [4, 8], [8, 10]]
    for key in ("psnr", "ssim", "retention", "label_accuracy", "position_error", "lost"):
      assert np.isfinite(e["overall"][key]), key
  assert res["classifier"]["test_accuracy"] >= 0.95
  for png in res["plots"]:
    with Image.open(png) as im:
      im.verify()
  assert "last_frame (baseline)" in r.stdout and "noisy" in r.stdout
  assert res["condition"] == "null" and len(res["seeds"]) == 2
  for e in res["entries"].values():
    assert [p["seed"] for p in e["per_seed"]] == res["seeds"]
    assert e["spread"]["overall"]["psnr"] >= 0
    assert e["overall"]["psnr"] == pytest.approx(
        np.mean([p["overall"]["psnr"] for p in e["per_seed"]]))
  assert "±" in r.stdout


def _exits_ground_truth(num_videos=3, frames=40):
  cfg = moving_digits.get_config("exits")
  source = [moving_digits.generate_example(cfg, "test", i) for i in range(num_videos)]
  return digit_metrics.ground_truth(source, cfg, num_videos, frames)


def test_digit_metrics_count_only_frames_where_the_digit_is_on_the_canvas():
  gt = _exits_ground_truth()
  clf = digit_metrics.digit_classifier(gt.digit_size)
  buckets = evaluate.bucket_edges(40, 40, (1,))
  m = evaluate.frame_metrics(gt.frames01, gt.frames01, gt.top_left, gt.templates, clf, radius=12,
                             ink_threshold=0.25, psnr_cap=100.0, visible=gt.visible)
  assert not gt.visible.all() and gt.visible.any()
  s = evaluate.summarize(m, gt.labels, buckets)
  assert s["overall"]["retention"] == 1.0 and s["overall"]["position_error"] == 0.0
  assert s["overall"]["label_accuracy"] == 1.0 and s["overall"]["lost"] == 0.0
  hidden = np.flatnonzero(~gt.visible.any(axis=(0, 2)))  # frames with no clip's digit on canvas
  for j in hidden:
    assert s["per_frame"]["retention"][j] is None
  # Without the mask the off-canvas frames count (as lost digits): the mask is what makes
  # the truth score perfectly.
  unmasked = evaluate.summarize({**m, "visible": np.ones_like(gt.visible)}, gt.labels, buckets)
  assert unmasked["overall"]["lost"] > 0 and unmasked["overall"]["retention"] < 1


def test_identity_after_the_gap_on_known_answers():
  gt = _exits_ground_truth(num_videos=4)
  clf = digit_metrics.digit_classifier(gt.digit_size)
  k = 2
  truth = gt.frames01[:, k:]
  g = evaluate.gap_identity(truth, gt, k, clf, window=8, ink_threshold=0.25)
  assert g["gap_clips"] == 4 and g["identity_after_gap"] == 1.0
  blank = evaluate.gap_identity(np.zeros_like(truth), gt, k, clf, window=8, ink_threshold=0.25)
  assert blank["identity_after_gap"] == 0.0
  # A video whose digit comes back as another clip's digit fails where the labels differ.
  swapped = truth[[1, 2, 3, 0]]
  sw = evaluate.gap_identity(swapped, gt, k, clf, window=8, ink_threshold=0.25)
  differ = gt.labels[:, 0] != gt.labels[[1, 2, 3, 0], 0]
  assert differ.any()
  assert sw["identity_after_gap"] <= 1.0 - differ.mean() + 0.25
  # A clip whose digit returns after the generated frames end does not count.
  short = evaluate.gap_identity(truth[:, :1], gt, k, clf, window=8, ink_threshold=0.25)
  assert short["gap_clips"] < 4


def test_mean_over_seeds_and_its_spread():
  a = {"per_frame": {"psnr": [1.0, 3.0]}, "buckets": [{"frames": [0, 2], "psnr": 2.0}],
       "overall": {"psnr": 2.0, "lost": None}, "gap": {"identity_after_gap": 0.5,
                                                       "gap_clips": 3}}
  b = {"per_frame": {"psnr": [3.0, 5.0]}, "buckets": [{"frames": [0, 2], "psnr": 4.0}],
       "overall": {"psnr": 4.0, "lost": None}, "gap": {"identity_after_gap": 1.0,
                                                       "gap_clips": 3}}
  m = evaluate.mean_over_seeds([a, b])
  assert m["per_frame"]["psnr"] == [2.0, 4.0]
  assert m["buckets"] == [{"frames": [0, 2], "psnr": 3.0}]
  assert m["overall"] == {"psnr": 3.0, "lost": None}
  assert m["spread"]["overall"]["psnr"] == pytest.approx(np.sqrt(2.0))
  assert m["spread"]["buckets"][0]["frames"] == [0, 2]
  assert m["spread"]["gap"]["identity_after_gap"] == pytest.approx(np.std([0.5, 1.0], ddof=1))
  assert m["gap"]["gap_clips"] == 3 and isinstance(m["gap"]["gap_clips"], int)
  assert evaluate.mean_over_seeds([a])["spread"] is None
  assert evaluate.eval_seeds(get_config().eval) == [0]


def test_null_condition_needs_a_null_label(checkpoint):
  workdir, cfg, _ = checkpoint
  model, mcfg, _ = load_model(get_config("smoke"), workdir)
  gt = _ground_truth(num_videos=2, frames=4)
  np.testing.assert_array_equal(evaluate.eval_labels("label", model, mcfg, gt, "m"), gt.labels)
  cfg_plain = get_config("smoke")
  cfg_plain.model.null_label = False
  with pytest.raises(UserError, match="null label"):
    evaluate.eval_labels("null", CausalDiT(cfg_plain.model, rngs=nnx.Rngs(0)), cfg_plain, gt, "m")
  cfg_null = get_config("smoke")
  cfg_null.model.null_label = True
  model_null = CausalDiT(cfg_null.model, rngs=nnx.Rngs(0))
  labels = evaluate.eval_labels("null", model_null, cfg_null, gt, "m")
  assert (labels == cfg_null.model.num_classes).all() and labels.shape == gt.labels.shape
  with pytest.raises(UserError, match="condition"):
    evaluate.eval_labels("none", model_null, cfg_null, gt, "m")
