"""The study driver (scripts/study.py): the window baseline's carry, its commands, its tables."""

import json
import os

import pytest

from scripts import study


def test_window_baseline_matches_the_arl2_carry():
  # 4 layers, 1 softmax: after 40 chunks ARL2-75% keeps 40 chunks of one layer's K/V plus three
  # states; the all-softmax window model keeps (sink + W) chunks in each of its 4 layers.
  sizes = dict(num_layers=4, softmax_layers=1, chunks=40, tokens_per_chunk=32, dim=96,
               head_dim=32)
  w = study.window_for_equal_carry(sink_chunks=1, **sizes)
  kv = 2 * 32 * 96
  arl2 = 40 * kv + 3 * 96 * 32
  # Three states of 96 x 32 = 1.5 chunks of K/V: (40 + 1.5) / 4 layers = 10.4 -> 1 sink + 9.
  assert w == 9
  assert abs(4 * (1 + w) * kv - arl2) <= 4 * kv / 2  # the nearest whole number of chunks
  assert study.window_for_equal_carry(sink_chunks=0, **sizes) == w + 1
  assert study.window_for_equal_carry(sink_chunks=1, **{**sizes, "chunks": 1}) == 1  # at least 1


def test_dry_run_prints_every_piece(capsys, tmp_path):
  study.main([f"--root={tmp_path}", "--dry_run", "--", "--config.train.batch_size=2"])
  out = capsys.readouterr().out
  for data in study.DATA:
    for piece in ("teacher", *study.STUDENTS, "eval"):
      assert f"== {data}/{piece}:" in out
  assert "--config.convert.memory_read=token" in out
  assert "window=" in out and "kv_cache.sink_chunks=0" in out  # exits only: plain window
  assert out.count("kv_cache.sink_chunks=0") == 1
  assert "--config.eval.condition=null" in out and "--config.eval.condition=label" in out
  assert out.count("--config.train.batch_size=2") == 10  # extra flags reach every call
  with pytest.raises(SystemExit, match="unknown"):
    study.main([f"--root={tmp_path}", "--only=teachers", "--dry_run"])


def test_summary_tables_from_eval_json(tmp_path):
  bucket = lambda a, b, r: {"frames": [a, b], "psnr": 15.0, "ssim": 0.5, "retention": r,
                             "label_accuracy": r, "position_error": 1.5, "lost": 0.0}
  entry = lambda r, overrides=None, name="teacher": {
      "workdir": str(tmp_path / "slow" / name), "overrides": overrides or {},
      "buckets": [bucket(0, 8, r), bucket(8, 32, r), bucket(32, 80, r / 2)],
      "spread": {"buckets": [bucket(0, 8, 0.1)] * 3}, "gap": {"identity_after_gap": None}}
  res = {"num_videos": 16, "context_frames": 4, "num_frames": 80, "condition": "label",
         "seeds": [0, 1], "buckets": [[0, 8], [8, 32], [32, 80]],
         "baselines": {"blank": entry(0.0)},
         "entries": {"teacher": entry(0.9),
                     "sink_window": entry(0.7, {"kv_cache.window_chunks": 9}),
                     "arl2_75": entry(0.8, name="arl2_75")}}
  os.makedirs(tmp_path / "slow" / "eval")
  with open(tmp_path / "slow" / "eval" / "eval.json", "w") as f:
    json.dump(res, f)
  os.makedirs(tmp_path / "slow" / "teacher")
  with open(tmp_path / "slow" / "teacher" / "study_seconds.json", "w") as f:
    json.dump({"seconds": 600.0, "sittings": 2}, f)
  os.makedirs(tmp_path / "slow" / "arl2_75")
  with open(tmp_path / "slow" / "arl2_75" / "summary.json", "w") as f:  # stage seconds count
    json.dump({"stage1": {"seconds": 60.0}, "stage2": {"seconds": 120.0}}, f)
  out = study.summarize(str(tmp_path))
  md = out["markdown"]
  assert "| teacher | 10 min | 15.00 ± 15.00 |" in md
  assert "(sampling switch)" in md and "0.900 ± 0.100" in md and "| arl2_75 | 3 min |" in md
  # Teacher targets: retention 0.9 at 1x (met), 0.45 at 10x (not met), error 1.5 px (met).
  assert out["teacher_targets"]["met"] == {"retention_1x": True, "retention_10x": False,
                                           "position_error_1x": True}
  assert os.path.exists(tmp_path / "study.md") and os.path.exists(tmp_path / "study.json")
