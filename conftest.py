"""Root conftest: makes the repository importable, keeps JAX on the CPU in fp32 for tests, and
shares one compilation cache across the session."""

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 fake CPU devices for the sharding tests; must be set before jax is imported.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

# JAX's persistent compilation cache, fresh for each session and shared with the subprocesses
# the command-line tests start (they inherit the environment): many tests compile the same
# programs (the smoke model's train and sampler steps in every CLI test), and on 2 CPU cores
# compilation is much of the suite's time. Set JAX_COMPILATION_CACHE_DIR to keep one across runs.
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _SESSION_CACHE = tempfile.mkdtemp(prefix="arl2-test-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _SESSION_CACHE:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
