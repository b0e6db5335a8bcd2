"""The benchmark's printed table and plots (time and memory per chunk, one line per policy)."""

from __future__ import annotations

import os

import numpy as np


def _mib(b) -> float:
  return float(b) / 2 ** 20


def table(results: dict) -> str:
  """A plain-text table of the summary."""
  h = results["horizon"]["paper_horizon_chunks"]
  rows = [("policy", "hybrid", "alpha", "r2", "alpha alone", "alpha flops", "ms first",
           "ms last", f"s @{h}",
           f"speedup @{h}", f"carry MiB @{h}", f"footprint MiB @{h}", "compiles")]
  ref = results["policies"][results["reference"]]
  for name, p in results["policies"].items():
    med = p["chunk_seconds"]
    at = min(h, len(med))
    total = float(np.sum(med[:at]))
    ref_total = float(np.sum(ref["chunk_seconds"][:at]))
    layers = len(p["hybrid_layers"]) + len(p["softmax_layers"])
    flops_alpha = f"{p['fit_flops']['alpha']:+.3f}" if p.get("fit_flops") else "-"
    alone_alpha = f"{p['fit_isolated']['alpha']:+.3f}" if p.get("fit_isolated") else "-"
    rows.append((name, f"{len(p['hybrid_layers'])}/{layers}",
                 f"{p['fit']['alpha']:+.3f}", f"{p['fit']['r2']:.2f}", alone_alpha, flops_alpha,
                 f"{1e3 * med[0]:.1f}", f"{1e3 * med[-1]:.1f}", f"{total:.2f}",
                 f"{ref_total / total:.2f}x", f"{_mib(p['carry_bytes'][at - 1]):.2f}",
                 f"{_mib(p['footprint_bytes'][at - 1]):.1f}", str(p["compiles"])))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
           for r in rows]
  lines.insert(1, "-" * len(lines[0]))
  for label, c in results["comparisons"].items():
    if c is None:
      lines.append(f"{label}: not reached (run --benchmark_chunks >= "
                   f"{h if label == 'paper_horizon' else 4 * h})")
      continue
    lines.append(
        f"{label} ({c['chunks']} chunks): {results['candidate']} vs {results['reference']}: "
        f"{c['speedup']:.2f}x faster (total), {100 * c['memory_reduction']:.1f}% less step "
        f"footprint, {100 * c['carry_reduction']:.1f}% less carry")
  for k, v in results["targets"].items():
    value = v["value"]
    value = f"{value:.3f}" if isinstance(value, float) else str(value)
    lines.append(f"target {k}: {value} (want {v['target']}) -> {'MET' if v['met'] else 'NOT MET'}")
  return "\n".join(lines)


def plot(results: dict, out_dir: str) -> list[str]:
  """benchmark_time.png and benchmark_memory.png: one line per policy vs chunk index."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  h = results["horizon"]["paper_horizon_chunks"]
  hw = results["hardware"]
  title = (f"{results['backbone']['tokens_per_chunk']} tokens/chunk, "
           f"{results['backbone']['num_layers']} layers, width {results['backbone']['dim']}; "
           f"{hw['device_kind']} ({hw['backend']}), jax {hw['jax']}")
  paths = []

  def horizon_lines(ax, n):
    for x, label in ((h, "paper horizon"), (4 * h, "4x")):
      if x <= n:
        ax.axvline(x, color="gray", ls=":", lw=1)
        ax.text(x, ax.get_ylim()[1], f" {label}", va="top", fontsize=7, color="gray")

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for name, p in results["policies"].items():
    med = np.asarray(p["chunk_seconds"]) * 1e3
    n = np.arange(1, len(med) + 1)
    (line,) = axes[0].plot(n, med, lw=1.2, label=name)
    fit = p["fit"]
    axes[1].loglog(n, med, lw=1, color=line.get_color(), alpha=0.6)
    xs = np.arange(fit["first_chunk"], fit["last_chunk"] + 1) + 1.0
    axes[1].loglog(xs, 1e3 * fit["prefactor"] * xs ** fit["alpha"], ls="--",
                   color=line.get_color(), label=f"{name}: alpha={fit['alpha']:+.2f}")
  axes[0].set(xlabel="chunk index n + 1", title="time per chunk",
              ylabel=f"ms per chunk ({results['statistic']} over passes)")
  axes[1].set(xlabel="chunk index n + 1 (log)", ylabel="ms per chunk (log)",
              title="log-log fit (dashed: fitted range)")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  horizon_lines(axes[0], results["horizon"]["num_chunks_run"])
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "benchmark_time.png"))
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
  for name, p in results["policies"].items():
    n = np.arange(1, len(p["carry_bytes"]) + 1)
    axes[0].plot(n, np.asarray(p["carry_bytes"]) / 2 ** 20, lw=1.2, label=name)
    axes[1].plot(n, np.asarray(p["footprint_bytes"]) / 2 ** 20, lw=1.2, label=name)
  rss = [r for r in results["policies"][next(iter(results["policies"]))]["rss_bytes"]]
  if all(r is not None for r in rss):
    axes[2].plot(np.arange(1, len(rss) + 1), np.asarray(rss) / 2 ** 20, color="k", lw=1.2,
                 label="process RSS (all policies)")
  axes[0].set(xlabel="chunk index n + 1", ylabel="MiB", title="carry (K/V caches + states)")
  axes[1].set(xlabel="chunk index n + 1", ylabel="MiB",
              title="step footprint (XLA: args + outputs - aliased + temps)")
  axes[2].set(xlabel="chunk index n + 1", ylabel="MiB", title="process RSS (shared)")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    horizon_lines(ax, results["horizon"]["num_chunks_run"])
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "benchmark_memory.png"))
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)
  return paths
