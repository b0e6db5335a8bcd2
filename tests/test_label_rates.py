"""scripts/label_rates.py: the per-label digit figures on videos with known answers, and the
script end to end on an untrained checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from configs.default import get_config
from data import digit_metrics, moving_digits
from hybrid_video import checkpoint as ckpt_lib
from hybrid_video.nn.model import CausalDiT
from hybrid_video.optim import make_optimizer
from hybrid_video.train_state import init_train_state
from scripts import label_rates


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  """Test clips of the main job's data regenerated to 20 frames: videos [B, T, H, W], labels."""
  source = moving_digits.prepare("slow", str(tmp_path_factory.mktemp("tfds"))) \
      .as_data_source("test")
  gt = digit_metrics.ground_truth(source, moving_digits.get_config("slow"), 12, 20)
  return gt.frames01[..., 0], gt.labels[:, 0]


def test_true_clips_score_their_labels_blank_and_swapped_ones_do_not(clips):
  videos, labels = clips
  classifier = digit_metrics.digit_classifier(12)
  truth = label_rates.score(videos, labels, classifier)
  assert truth["label_rate"] >= 0.95 and truth["single_digit_rate"] == 1.0
  assert truth["steady_rate"] == 1.0
  assert set(truth["per_range"]) == {"0-2", "2-8", "8-16", "16-20"}
  assert set(truth["per_label"]) == set(labels.tolist())
  blank = label_rates.score(np.zeros_like(videos), labels, classifier)
  assert blank["label_rate"] == 0.0 and blank["single_digit_rate"] == 0.0
  other = (labels + 1) % 10  # every clip scored against a label it does not show
  assert label_rates.score(videos, other, classifier)["label_rate"] <= 0.05
  # one clip's frames 8 on blanked: only the ranges after frame 8 lose it
  cut = videos.copy()
  cut[:, 8:] = 0.0
  r = label_rates.score(cut, labels, classifier)
  assert r["per_range"]["0-2"] == truth["per_range"]["0-2"] and r["per_range"]["8-16"] == 0.0
  with pytest.raises(ValueError, match="B labels"):
    label_rates.score(videos, labels[:3], classifier)


def _smoke_checkpoint(tmp_path, step: int) -> None:
  """An untrained smoke-config checkpoint at `step` in tmp_path/run (data in tmp_path/tfds)."""
  cfg = get_config("smoke")
  cfg.data.dir = str(tmp_path / "tfds")
  state = init_train_state(CausalDiT(cfg.model, rngs=nnx.Rngs(0)), make_optimizer(cfg.train))
  ck = ckpt_lib.Checkpointer(str(tmp_path / "run"))
  ck.save(step, state, cfg, force=True)
  ck.wait()
  ck.close()


@pytest.mark.slow
def test_script_end_to_end_on_a_checkpoint(tmp_path, capsys):
  _smoke_checkpoint(tmp_path, 3)
  out = tmp_path / "rates.json"
  r = label_rates.main([f"--workdir={tmp_path / 'run'}", "--frames=4", "--per_label=1",
                        "--guidance=2", f"--json={out}"])
  assert r["videos"] == 10 and r["frames"] == 4 and r["step"] == 3 and r["guidance"] == 2.0
  assert 0.0 <= r["label_rate"] <= 1.0 and out.exists()
  assert "per label" in capsys.readouterr().out
  with pytest.raises(SystemExit, match="not a directory"):
    label_rates.main([f"--workdir={tmp_path / 'nope'}"])


def test_label_use_is_zero_for_a_label_blind_model_and_not_for_one_that_reads_labels(tmp_path):
  cfg = get_config("smoke")
  cfg.data.dir = str(tmp_path / "tfds")
  video, labels = label_rates.training_clips(cfg, 6)
  assert video.shape == (6, 4, 16, 16, 1) and labels.shape == (6,)
  assert video.min() >= -1.0 and video.max() <= 1.0
  model = CausalDiT(cfg.model, rngs=nnx.Rngs(0))
  # The head is zero at init: give it weights, so that the prediction depends on the tokens.
  model.head.kernel[...] = 0.05 * np.random.default_rng(0).normal(size=model.head.kernel.shape)
  reads = label_rates.label_use(model, video, labels, levels=(0.5, 0.9))
  assert set(reads) == {0.5, 0.9}
  assert all(abs(r["gain"]) > 1e-6 and r["null"] > 0 for r in reads.values())
  # Every label token made equal to the null token: the label carries nothing.
  table = model.cond_embed.table.embedding
  table[...] = np.broadcast_to(np.asarray(table[...])[-1:], table.shape).copy()
  blind = label_rates.label_use(model, video, labels, levels=(0.5, 0.9))
  assert all(r["gain"] == 0.0 and r["label"] == r["null"] for r in blind.values())


@pytest.mark.slow
def test_label_use_from_the_command_line(tmp_path, capsys):
  _smoke_checkpoint(tmp_path, 2)
  r = label_rates.main([f"--workdir={tmp_path / 'run'}", "--label_use",
                        f"--json={tmp_path / 'use.json'}"])
  assert r["step"] == 2 and set(r["label_use"]) == set(label_rates.LABEL_USE_LEVELS)
  assert "gain" in capsys.readouterr().out and (tmp_path / "use.json").exists()
