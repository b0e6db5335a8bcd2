"""Block sizes of the Pallas local-attention kernel (and of the XLA path's key sweeps), and
where tuned values live.

`AttentionBlockSizes` is frozen and validated on construction. `get_block_sizes` looks up
`TUNED` by (device kind, dtype, shape bucket) and falls back to `DEFAULTS[platform]` (the
lookup itself is `common.lookup_block_sizes`).

The GPU lowering is Pallas Triton: every block dimension that the kernel loads must be a power
of two, and `tl.dot` needs at least 16 rows and columns. Mosaic TPU wants block_k a multiple
of 128 (lanes) for the key-major loads and bounds the keys held in VMEM per call, hence
`max_kv_per_call` (longer key sets are split and merged by log-sum-exp).
"""

import dataclasses

from kernels import common
# Re-exported: `TUNED` is keyed by `shape_bucket(num_keys)`.
from kernels.common import shape_bucket  # pylint: disable=unused-import


@dataclasses.dataclass(frozen=True)
class AttentionBlockSizes:
  """Tiling of the flash-attention forward kernel.

  Attributes:
    block_q: queries per program (grid step). Power of two, >= 8.
    block_k: keys per inner-loop step. Power of two, >= 8.
    max_kv_per_call: None, or the most keys one kernel call holds (a multiple of block_k);
      longer key sets run as several calls merged by log-sum-exp (needed on TPU, where a
      program's whole key block lives in VMEM).
    bwd_block_q, bwd_block_k: queries and keys per step of the jnp recomputation backward
      (its logits are bwd_block_q x bwd_block_k per batch and head; under the history mask
      the key blocks a query block cannot see are skipped).
    xla_key_block: keys per step of the XLA path's blocked sweeps (`xla.py`: the cached
      attention over a long cache, the teacher-forcing attention over a long clip); None
      reads `xla.CACHE_KEY_BLOCK` / `xla.TEACHER_FORCING_KEY_BLOCK` (2048). Not a Pallas
      tiling: it sets the XLA path's fp32 logits per step, O(queries x xla_key_block).
    num_warps, num_stages: Triton launch parameters (GPU only); None lets Pallas choose.
  """
  block_q: int = 128
  block_k: int = 64
  max_kv_per_call: int | None = None
  bwd_block_q: int = 512
  bwd_block_k: int = 2048
  xla_key_block: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None

  def __post_init__(self):
    for name in ('block_q', 'block_k'):
      value = getattr(self, name)
      if not common.is_power_of_two(value) or value < 8:
        raise ValueError(f'{name}={value!r} must be a power of two >= 8')
    for name in ('bwd_block_q', 'bwd_block_k'):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f'{name}={value!r} must be a positive integer')
    if self.xla_key_block is not None and (
        not isinstance(self.xla_key_block, int) or self.xla_key_block <= 0):
      raise ValueError(f'xla_key_block={self.xla_key_block!r} must be None or a positive '
                       'integer')
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


def get_block_sizes(dtype, num_keys, *, device=None, interpret=False):
  """Block sizes for `device` (default: the first local device), dtype and key count."""
  return common.lookup_block_sizes(TUNED, DEFAULTS, dtype, num_keys, device=device,
                                   interpret=interpret)
