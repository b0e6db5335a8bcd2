"""Where a measurement ran: hardware, versions, the code's git state, memory and BLAS threads."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import sys
from typing import Any

import jax
import numpy as np


def hardware_info() -> dict[str, Any]:
  import flax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  info = {
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "num_devices": len(devices),
      "cpu": cpu,
      "cpu_count": os.cpu_count(),
      "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "platform": platform.platform(),
      "python": sys.version.split()[0],
      "jax": jax.__version__,
      "jaxlib": _version("jaxlib"),
      "flax": flax.__version__,
      "numpy": np.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  try:
    import psutil  # pylint: disable=g-import-not-at-top
    info["memory_total_bytes"] = int(psutil.virtual_memory().total)
  except ImportError:
    pass
  return info


def provenance() -> dict[str, Any]:
  """The code that produced a result: git commit and locally modified files (if in git)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True,
                                    timeout=10, check=True).stdout
    return {"commit": run("rev-parse", "HEAD").strip(),
            "modified": [l[3:] for l in run("status", "--porcelain").splitlines() if l]}
  except Exception:  # pylint: disable=broad-except  # not a git checkout, or no git
    return {}


def _version(package: str):
  try:
    from importlib.metadata import version  # pylint: disable=g-import-not-at-top
    return version(package)
  except Exception:  # pylint: disable=broad-except
    return None


def blas_threads_limit(threads: int):
  """Limit the BLAS/LAPACK thread pools (OpenBLAS of numpy and scipy) to `threads`; 0 = as is.

  jaxlib's CPU LAPACK custom calls (the triangular solve of the chunked gated delta rule) run
  in scipy's OpenBLAS. Its own threads compete with XLA's for the cores and, on a loaded
  machine, stall a step by tens of milliseconds; one thread makes the timings reproducible.
  """
  if threads <= 0:
    return contextlib.nullcontext()
  import scipy.linalg  # pylint: disable=g-import-not-at-top,unused-import  # loads its BLAS
  import threadpoolctl  # pylint: disable=g-import-not-at-top
  return threadpoolctl.threadpool_limits(limits=threads, user_api="blas")


def blas_info() -> list[dict]:
  try:
    import threadpoolctl  # pylint: disable=g-import-not-at-top
    return [{"api": i.get("internal_api"), "threads": i.get("num_threads"),
             "library": os.path.basename(i.get("filepath", ""))}
            for i in threadpoolctl.threadpool_info()]
  except Exception:  # pylint: disable=broad-except
    return []


def rss_bytes() -> int | None:
  try:
    import psutil  # pylint: disable=g-import-not-at-top
    return int(psutil.Process().memory_info().rss)
  except ImportError:
    return None


def peak_rss_bytes() -> int:
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def device_memory() -> dict | None:
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats:
    return None
  return {k: int(v) for k, v in stats.items() if k in ("bytes_in_use", "peak_bytes_in_use",
                                                         "bytes_limit")}
