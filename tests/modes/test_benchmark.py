"""--mode=benchmark: the exponent fit, the horizon mapping and a tiny run's JSON and plots."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from configs.benchmark import get_config
from hybrid_video.modes import benchmark as bench
from hybrid_video.errors import UserError


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.5, 2.0])
def test_fit_exponent_recovers_synthetic_power_laws(alpha):
  n = np.arange(60)
  fit = bench.fit_exponent(0.003 * (n + 1.0) ** alpha)
  assert fit["alpha"] == pytest.approx(alpha, abs=1e-9)
  assert fit["prefactor"] == pytest.approx(0.003)
  assert fit["r2"] == pytest.approx(1.0)
  assert (fit["first_chunk"], fit["last_chunk"]) == (15, 59)  # the last three quarters


def test_fit_exponent_ignores_a_fixed_cost_start_and_noise():
  rng = np.random.default_rng(0)
  n = np.arange(200)
  flat = 0.01 * np.exp(0.01 * rng.standard_normal(200))
  assert abs(bench.fit_exponent(flat)["alpha"]) < 0.01
  linear = (0.02 + 0.001 * (n + 1)) * np.exp(0.01 * rng.standard_normal(200))
  assert 0.8 < bench.fit_exponent(linear)["alpha"] < 1.0  # -> 1 as the fixed cost fades
  with pytest.raises(UserError, match="at least 2 chunks"):
    bench.fit_exponent([0.1, 0.1])


def test_paper_horizon_mapping():
  assert bench.paper_horizon_chunks(3) == 77     # the paper's own chunks of 3 latent frames
  assert bench.paper_horizon_chunks(2) == 116
  assert bench.paper_horizon_chunks(1) == 231
  assert get_config().benchmark.num_chunks == 77


def test_tiny_benchmark_writes_every_field_and_readable_plots(tmp_path, capsys):
  config = get_config("tiny")
  config.model.num_layers = 2
  config.sampler.cache_chunks = 2                 # capacities 2, 4: two compiles for softmax
  b = config.benchmark
  b.policies = ("softmax_full", "arl2_100")
  b.candidate = "arl2_100"
  b.paper_latent_frames = 3                       # horizon of 3 one-frame chunks: reached
  b.num_chunks = 4
  config.progress = False
  results = bench.benchmark_main(config, str(tmp_path))
  path = os.path.join(tmp_path, "benchmark", "benchmark.json")
  with open(path) as f:
    saved = json.load(f)
  for key in ("hardware", "config", "backbone", "horizon", "method", "policies", "comparisons",
              "targets", "process", "plots", "provenance"):
    assert key in saved, key
  assert saved["hardware"]["jax"] and saved["hardware"]["backend"] == "cpu"
  assert saved["horizon"]["paper_horizon_chunks"] == 3
  assert saved["config"]["benchmark"]["num_chunks"] == 4  # the config as given
  per_policy_keys = ("hybrid_layers", "compiles", "compiles_during_timing", "chunk_seconds",
                     "chunk_seconds_median", "chunk_seconds_min", "chunk_seconds_passes",
                     "grow_seconds", "carry_bytes", "footprint_bytes",
                     "rss_bytes", "memory_analysis_by_capacity", "fit", "constant_carry",
                     "total_seconds", "capacity_chunks", "params", "fit_isolated", "fit_flops",
                     "isolated_chunk_seconds", "flops_per_chunk")
  for name, p in saved["policies"].items():
    for key in per_policy_keys:
      assert key in p, (name, key)
    assert len(p["chunk_seconds"]) == len(p["carry_bytes"]) == 4
    assert p["compiles_during_timing"] == 0
    assert all(f > 0 for f in p["footprint_bytes"])
  full, hybrid = saved["policies"]["softmax_full"], saved["policies"]["arl2_100"]
  assert full["compiles"] == 2 and full["capacity_chunks"] == [2, 2, 4, 4]
  assert full["carry_bytes"][-1] > full["carry_bytes"][0]
  assert hybrid["compiles"] == 1 and hybrid["constant_carry"]
  assert len(set(hybrid["flops_per_chunk"])) == 1
  assert hybrid["fit_flops"]["alpha"] == pytest.approx(0.0, abs=1e-9)
  assert full["flops_per_chunk"][-1] > full["flops_per_chunk"][0]
  paper = saved["comparisons"]["paper_horizon"]
  assert paper["chunks"] == 3 and paper["speedup"] > 0 and 0 < paper["carry_reduction"] <= 1
  assert saved["comparisons"]["4x_paper_horizon"] is None  # 12 chunks were not run
  assert saved["targets"]["arl2_100_compiles"]["met"]
  for png in saved["plots"]:
    with Image.open(png) as im:
      im.verify()
    with Image.open(png) as im:
      assert im.size[0] > 400 and im.size[1] > 200
  out = capsys.readouterr().out
  assert "softmax_full" in out and "arl2_100" in out and "paper_horizon" in out
  assert results["json"] == path


def test_unknown_policy_is_a_user_error():
  config = get_config("tiny")
  config.benchmark.policies = ("softmax_full", "nope")
  with pytest.raises(UserError, match="nope"):
    bench.run_benchmark(config, num_chunks=3, progress=False)


@pytest.mark.slow
def test_predicted_comparison_at_the_paper_horizons(tmp_path):
  """benchmark.predict: nothing executed; FLOPs per chunk from traces (affine in the swept keys,
  checked), memory from XLA at the 921- and 1005-frame horizons."""
  c = get_config("tiny")
  c.model.frames_per_chunk = 3
  c.benchmark.frame_hw = (16, 16)
  c.benchmark.predict = True
  c.benchmark.num_chunks = 84
  c.benchmark.policies = ("softmax_full", "arl2_100")
  c.benchmark.candidate = "arl2_100"
  c.progress = False
  r = bench.benchmark_main(c, str(tmp_path))
  assert r["horizons"] == {921: 77, 1005: 84}
  soft, hyb = r["policies"]["softmax_full"], r["policies"]["arl2_100"]
  assert len(soft["flops_per_chunk"]) == 84
  assert len(set(hyb["flops_per_chunk"])) == 1                 # constant work per chunk
  assert np.all(np.diff(soft["flops_per_chunk"]) >= 0) and soft["flops_per_chunk"][-1] > \
      3 * soft["flops_per_chunk"][0]                            # grows with the history
  assert soft["memory"]["1005"]["footprint"] > soft["memory"]["921"]["footprint"]
  assert hyb["memory"]["1005"] == hyb["memory"]["921"]
  cmp = r["comparison"]["921"]
  assert cmp["speedup"] > 1 and 0 < cmp["memory_reduction"] < 1
  assert os.path.exists(tmp_path / "benchmark" / "prediction.json")
