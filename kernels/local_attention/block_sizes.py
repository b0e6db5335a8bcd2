"""Block sizes of the Pallas local-attention kernel, and where tuned values live.

`AttentionBlockSizes` is frozen and validated on construction. `get_block_sizes` looks up
`TUNED` by (device kind, dtype, shape bucket) and falls back to `DEFAULTS[platform]`.

The GPU lowering is Pallas Triton: every block dimension that the kernel loads must be a power
of two, and `tl.dot` needs at least 16 rows and columns. Mosaic TPU wants block_k a multiple
of 128 (lanes) for the key-major loads and bounds the keys held in VMEM per call, hence
`max_kv_per_call` (longer key sets are split and merged by log-sum-exp).
"""

import dataclasses

import jax


def _is_power_of_two(n):
  return isinstance(n, int) and n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class AttentionBlockSizes:
  """Tiling of the flash-attention forward kernel.

  Attributes:
    block_q: queries per program (grid step). Power of two, >= 8.
    block_k: keys per inner-loop step. Power of two, >= 8.
    max_kv_per_call: None, or the most keys one kernel call holds (a multiple of block_k);
      longer key sets run as several calls merged by log-sum-exp (needed on TPU, where a
      program's whole key block lives in VMEM).
    bwd_block_q: queries per step of the jnp recomputation backward (bounds its memory to
      bwd_block_q x keys logits per batch and head).
    num_warps, num_stages: Triton launch parameters (GPU only); None lets Pallas choose.
  """
  block_q: int = 128
  block_k: int = 64
  max_kv_per_call: int | None = None
  bwd_block_q: int = 512
  num_warps: int | None = None
  num_stages: int | None = None

  def __post_init__(self):
    for name in ('block_q', 'block_k'):
      value = getattr(self, name)
      if not _is_power_of_two(value) or value < 8:
        raise ValueError(f'{name}={value!r} must be a power of two >= 8')
    if not isinstance(self.bwd_block_q, int) or self.bwd_block_q <= 0:
      raise ValueError(f'bwd_block_q={self.bwd_block_q!r} must be a positive integer')
    if self.max_kv_per_call is not None and (
        not isinstance(self.max_kv_per_call, int) or self.max_kv_per_call <= 0
        or self.max_kv_per_call % self.block_k):
      raise ValueError(f'max_kv_per_call={self.max_kv_per_call!r} must be None or a positive '
                       f'multiple of block_k={self.block_k}')
    for name in ('num_warps', 'num_stages'):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value <= 0):
        raise ValueError(f'{name}={value!r} must be None or a positive integer')


# Per-platform defaults. 'cpu' is interpret mode only: small blocks keep the interpreted grid
# cheap and still exercise several blocks and the padding path.
DEFAULTS = {
    'gpu': AttentionBlockSizes(block_q=128, block_k=64, num_warps=8, num_stages=2),
    'tpu': AttentionBlockSizes(block_q=128, block_k=128, max_kv_per_call=8192),
    'cpu': AttentionBlockSizes(block_q=16, block_k=16),
}

# Tuned values: (device_kind substring, dtype name, shape bucket) -> block sizes. The shape
# bucket is `shape_bucket(num_keys)`. NOT YET MEASURED: these entries are starting points
# (jax's Pallas Triton flash-attention defaults for head dim 128); replace them with timings
# from `python -m kernels.benchmark` on the named device.
TUNED = {
    ('H100', 'bfloat16', 'long'): AttentionBlockSizes(
        block_q=128, block_k=64, num_warps=8, num_stages=2),
    ('H200', 'bfloat16', 'long'): AttentionBlockSizes(
        block_q=128, block_k=64, num_warps=8, num_stages=2),
}


def shape_bucket(num_keys):
  """'short' (< 1024 keys), 'medium' (< 8192) or 'long'."""
  if num_keys < 1024:
    return 'short'
  if num_keys < 8192:
    return 'medium'
  return 'long'


def platform_of(device):
  """'gpu', 'tpu' or 'cpu' for a jax device (CUDA and ROCm both count as 'gpu')."""
  platform = device.platform.lower()
  return 'gpu' if platform in ('gpu', 'cuda', 'rocm') else platform


def get_block_sizes(dtype, num_keys, *, device=None, interpret=False):
  """Block sizes for `device` (default: the first local device), dtype and key count."""
  if interpret:
    return DEFAULTS['cpu']
  device = jax.local_devices()[0] if device is None else device
  kind = device.device_kind
  bucket = shape_bucket(num_keys)
  dtype_name = jax.numpy.dtype(dtype).name
  for (kind_part, tuned_dtype, tuned_bucket), sizes in TUNED.items():
    if kind_part in kind and tuned_dtype == dtype_name and tuned_bucket == bucket:
      return sizes
  return DEFAULTS.get(platform_of(device), DEFAULTS['cpu'])
