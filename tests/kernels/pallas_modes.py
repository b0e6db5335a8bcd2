"""How the Pallas kernel tests run: interpret mode on CPU, compiled on a GPU when one is there.

Each test class is parametrised over `MODES`:
- `interpret`: Pallas interpret mode with the GPU (Triton) block layout and constraints, on
  whatever backend runs the tests (CPU here).
- `interpret-tpu`: interpret mode with the TPU (Mosaic) layout, for the tests that exercise
  layout-dependent code (key-set splitting); TPU compilation itself is not tested here.
- `gpu`: interpret off, compiled for the local GPU. Marked `gpu` and skipped, with the reason
  "needs a GPU", unless a GPU is visible to jax. The root conftest pins JAX_PLATFORMS=cpu when
  it is unset, so on a GPU machine run e.g. `JAX_PLATFORMS=cuda pytest -m gpu tests/kernels`.
"""

import jax
import numpy as np
import pytest


def gpu_available():
  try:
    return bool(jax.devices('gpu'))
  except RuntimeError:
    return False


needs_gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available(),
                       reason='needs a GPU (run with JAX_PLATFORMS=cuda on a GPU machine)'),
]

INTERPRET = dict(interpret=True, target='gpu')
INTERPRET_TPU = dict(interpret=True, target='tpu')
DEVICE = dict(interpret=False, target=None)

MODES = [
    pytest.param(INTERPRET, id='interpret'),
    pytest.param(DEVICE, id='gpu', marks=needs_gpu),
]

MODES_WITH_TPU_LAYOUT = [
    pytest.param(INTERPRET, id='interpret'),
    pytest.param(INTERPRET_TPU, id='interpret-tpu'),
    pytest.param(DEVICE, id='gpu', marks=needs_gpu),
]


def rel_err(actual, expected):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  return np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30)


def assert_close(actual, expected, tol, what):
  err = rel_err(actual, expected)
  assert err <= tol, f'{what}: max relative error {err:.3g} > {tol:.3g}'
  return err
