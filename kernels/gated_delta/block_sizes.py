"""Block sizes of the Pallas gated-delta kernels, and where tuned values live.

The sub-chunk length C is not here: it is the `chunk_size` argument of the API (a model
hyper-parameter shared with the XLA path). `GatedDeltaBlockSizes` is frozen and validated on
construction; `get_block_sizes` looks up `TUNED` by (device kind, dtype, shape bucket) and
falls back to `DEFAULTS[platform]`.
"""

import dataclasses

import jax


def _is_power_of_two(n):
  return isinstance(n, int) and n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class GatedDeltaBlockSizes:
  """Tiling of the gated-delta state kernel.

  Attributes:
    block_v: value columns of the state per program, or None for all V. The columns of the
      state evolve independently, so the sequential kernel runs B * H * V / block_v programs.
      Power of two >= 8.
    block_r: reading queries per step of the fused ARL2 read. Power of two >= 8.
    num_warps, num_stages: Triton launch parameters (GPU only); None lets Pallas choose.
  """
  block_v: int | None = 64
  block_r: int = 64
  num_warps: int | None = None
  num_stages: int | None = None

  def __post_init__(self):
    if self.block_v is not None and (not _is_power_of_two(self.block_v) or self.block_v < 8):
      raise ValueError(f'block_v={self.block_v!r} must be None or a power of two >= 8')
    if not _is_power_of_two(self.block_r) or self.block_r < 8:
      raise ValueError(f'block_r={self.block_r!r} must be a power of two >= 8')
    for name in ('num_warps', 'num_stages'):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value <= 0):
        raise ValueError(f'{name}={value!r} must be None or a positive integer')


DEFAULTS = {
    'gpu': GatedDeltaBlockSizes(block_v=64, block_r=64, num_warps=4, num_stages=2),
    # Mosaic wants the minor block dim to be 128 lanes or the whole V.
    'tpu': GatedDeltaBlockSizes(block_v=None, block_r=128),
    'cpu': GatedDeltaBlockSizes(block_v=None, block_r=16),  # interpret mode only
}

# Tuned values: (device_kind substring, dtype name, shape bucket) -> block sizes, the bucket
# from `shape_bucket(tokens per call)`. NOT YET MEASURED: starting points taken from fla's
# chunk_gated_delta_rule_fwd_h launch (BV = 64, 4 warps, 2 stages) for K = V = 128; replace
# them with measurements from the named device.
TUNED = {
    ('H100', 'bfloat16', 'long'): GatedDeltaBlockSizes(
        block_v=64, block_r=64, num_warps=4, num_stages=2),
    ('H200', 'bfloat16', 'long'): GatedDeltaBlockSizes(
        block_v=64, block_r=64, num_warps=4, num_stages=2),
}


def shape_bucket(num_tokens):
  """'short' (< 1024 tokens), 'medium' (< 8192) or 'long'."""
  if num_tokens < 1024:
    return 'short'
  if num_tokens < 8192:
    return 'medium'
  return 'long'


def platform_of(device):
  """'gpu', 'tpu' or 'cpu' for a jax device (CUDA and ROCm both count as 'gpu')."""
  platform = device.platform.lower()
  return 'gpu' if platform in ('gpu', 'cuda', 'rocm') else platform


def get_block_sizes(dtype, num_tokens, *, device=None, interpret=False):
  """Block sizes for `device` (default: the first local device), dtype and token count."""
  if interpret:
    return DEFAULTS['cpu']
  device = jax.local_devices()[0] if device is None else device
  kind = device.device_kind
  bucket = shape_bucket(num_tokens)
  dtype_name = jax.numpy.dtype(dtype).name
  for (kind_part, tuned_dtype, tuned_bucket), sizes in TUNED.items():
    if kind_part in kind and tuned_dtype == dtype_name and tuned_bucket == bucket:
      return sizes
  return DEFAULTS.get(platform_of(device), DEFAULTS['cpu'])
