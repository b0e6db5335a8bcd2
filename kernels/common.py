"""Helpers shared by every op folder under kernels/: one copy each.

- Device and platform: `platform_of`, `local_platform` ('gpu', 'tpu' or 'cpu').
- Back-end choice: `resolve_implementation` ("pallas" | "xla" | "reference" | None; an explicit
  choice raises if it cannot run here, None picks the best back-end for the device) and
  `resolve_target` (the lowering a Pallas kernel is built for).
- Block sizes: `shape_bucket` and `lookup_block_sizes`, the lookup by (device kind, dtype,
  shape bucket) behind each op's `block_sizes.get_block_sizes`. Each op keeps its own frozen
  block-size dataclass, `DEFAULTS` and `TUNED` table in its `block_sizes.py`.
- Loop carries: `zeros_after`, zero-initialised scan carries that XLA cannot materialise
  before the loop's inputs exist (so under remat they are not held across the forward pass).
- Argument checks and padding: `check_rank`, `expect_shape`, `pad_axis`, `round_up`,
  `is_power_of_two`, and `pallas_compiler_params` for the Triton / Mosaic launch.

Op-specific knowledge (which chunk sizes a kernel accepts, the op's name in messages) comes in
as arguments, so this module imports no op folder.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('xla', 'reference', 'pallas')
# Platforms the Pallas kernels compile for; every other one needs interpret mode.
PALLAS_PLATFORMS = ('gpu', 'tpu')
TARGETS = PALLAS_PLATFORMS


def platform_of(device):
  """'gpu', 'tpu' or 'cpu' for a jax device (CUDA and ROCm both count as 'gpu')."""
  platform = device.platform.lower()
  return 'gpu' if platform in ('gpu', 'cuda', 'rocm') else platform


def local_platform():
  """`platform_of` the first local device: where an un-sharded call runs."""
  return platform_of(jax.local_devices()[0])


def resolve_implementation(implementation, interpret, *, op, pallas_supports=None):
  """The implementation that will run; raises if an explicit choice cannot run here.

  Args:
    implementation: "pallas", "xla", "reference" or None.
    interpret: Pallas interpret mode was asked for; with None it selects "pallas" everywhere,
      so a request to test the kernel is never silently answered by XLA.
    op: the op's name in error messages, e.g. 'attention'.
    pallas_supports: optional `platform -> bool`; None's choice of "pallas" on GPU/TPU also
      needs it to be true (an op's kernel may accept only some shapes or chunk sizes).

  Returns:
    "pallas", "xla" or "reference".
  """
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f'{implementation=} is not supported; expected one of {IMPLEMENTATIONS} or None')
  platform = local_platform()
  if implementation is None:
    if interpret:
      return 'pallas'
    if platform in PALLAS_PLATFORMS and (pallas_supports is None or pallas_supports(platform)):
      return 'pallas'
    return 'xla'
  if implementation == 'pallas' and not interpret and platform not in PALLAS_PLATFORMS:
    raise ValueError(
        f"implementation='pallas' cannot run on the {platform!r} backend: the Pallas {op} "
        f'kernels compile only for {PALLAS_PLATFORMS}. Pass interpret=True to run them in '
        "Pallas interpret mode (slow, for tests), or use implementation='xla'")
  return implementation


def resolve_target(target, interpret, *, op):
  """'gpu' or 'tpu': the lowering (and block layout) a Pallas kernel is built for.

  An explicit `target` is validated and kept; None takes the local platform, or 'gpu' in
  interpret mode on any other backend (so interpret runs on CPU exercise the GPU constraints).
  `op` names the kernel in the error message.
  """
  if target is not None:
    if target not in TARGETS:
      raise ValueError(f'{target=} must be one of {TARGETS}')
    return target
  platform = local_platform()
  if platform in TARGETS:
    return platform
  if interpret:
    return 'gpu'
  raise ValueError(
      f'the Pallas {op} kernel cannot be compiled for the {platform!r} backend; pass '
      'interpret=True to run it in interpret mode, or use the XLA implementation')


def pallas_compiler_params(target, sizes, num_grid_dims):
  """Triton launch parameters (from `sizes.num_warps` / `num_stages`) for 'gpu', Mosaic's
  all-parallel grid semantics for 'tpu'."""
  # Imported on use: each back-end module pulls in its lowering, only one of which is needed.
  if target == 'gpu':
    from jax.experimental.pallas import triton as pl_triton  # pylint: disable=g-import-not-at-top
    return pl_triton.CompilerParams(num_warps=sizes.num_warps, num_stages=sizes.num_stages)
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  return pltpu.CompilerParams(dimension_semantics=('parallel',) * num_grid_dims)


def shape_bucket(size):
  """'short' (< 1024 tokens or keys), 'medium' (< 8192) or 'long'."""
  if size < 1024:
    return 'short'
  if size < 8192:
    return 'medium'
  return 'long'


def lookup_block_sizes(tuned, defaults, dtype, size, *, device=None, interpret=False):
  """Block sizes from an op's tables, for `device` (default: the first local device).

  Args:
    tuned: {(device_kind substring, dtype name, shape bucket): sizes}; the first entry whose
      substring is in `device.device_kind` and whose dtype and `shape_bucket(size)` match wins.
    defaults: {'gpu' | 'tpu' | 'cpu': sizes}, used when nothing in `tuned` matches; 'cpu' is
      the interpret-mode entry and the fallback for any other platform.
    dtype: the input dtype.
    size: the token or key count that picks the shape bucket.
    device: a jax device, or None for the first local one.
    interpret: interpret mode, which always takes `defaults['cpu']`.
  """
  if interpret:
    return defaults['cpu']
  device = jax.local_devices()[0] if device is None else device
  kind = device.device_kind
  bucket = shape_bucket(size)
  dtype_name = jnp.dtype(dtype).name
  for (kind_part, tuned_dtype, tuned_bucket), sizes in tuned.items():
    if kind_part in kind and tuned_dtype == dtype_name and tuned_bucket == bucket:
      return sizes
  return defaults.get(platform_of(device), defaults['cpu'])


def zeros_after(deps, *specs):
  """(zeros, deps): zero arrays of `specs` ((shape, dtype) pairs) that XLA cannot build before
  `deps` exist, and `deps` passed through. Read the loop's inputs from the returned `deps`.

  A scan's zero-initialised carry is a constant. Copy insertion gives the loop a writable copy
  of it, and the scheduler is free to make that copy at the very start of the program: under
  remat, a layer's backward loop then holds its accumulators across the whole forward pass,
  once per layer (XLA:CPU did: 1.4 GiB per softmax layer at Wan2.1-1.3B's 7-chunk clip). Here
  the zeros are broadcasts of a scalar that an optimization barrier ties to `deps`: not a
  constant, so no early copy, and not computable before the loop's inputs exist. The caller
  must use the returned `deps`, or the barrier's unused operands are pruned (jaxpr DCE) and the
  tie is lost.
  """
  zero, deps = jax.lax.optimization_barrier((jnp.zeros((), jnp.float32), deps))
  return tuple(jnp.broadcast_to(zero.astype(dtype), shape) for shape, dtype in specs), deps


def check_rank(name, x, rank, description):
  """Raises unless `x` has `rank` dimensions; `description` is its shape in letters."""
  if x.ndim != rank:
    raise ValueError(f'{name} has shape {x.shape}, expected {description}')


def expect_shape(name, x, expected, description):
  """Raises unless `x.shape == expected`; `description` is the shape in letters."""
  if tuple(x.shape) != tuple(expected):
    raise ValueError(f'{name} has shape {x.shape}, expected {description} = {tuple(expected)}')


def pad_axis(x, axis, size, value=0):
  """Pads `x` along `axis` at the end, with `value`, up to `size`."""
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def round_up(n, m):
  """The smallest multiple of `m` that is >= `n`."""
  return -(-n // m) * m


def is_power_of_two(n):
  """True for a positive Python int that is a power of two."""
  return isinstance(n, int) and n > 0 and n & (n - 1) == 0
