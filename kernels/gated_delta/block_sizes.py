"""Block sizes of the Pallas gated-delta kernels, and where tuned values live.

The sub-chunk length C is not here: it is the `chunk_size` argument of the API (a model
hyper-parameter shared with the XLA path). `GatedDeltaBlockSizes` is frozen and validated on
construction; `get_block_sizes` looks up `TUNED` by (device kind, dtype, shape bucket) and
falls back to `DEFAULTS[platform]` (the lookup itself is `common.lookup_block_sizes`).
"""

import dataclasses

from kernels import common
# Re-exported: `TUNED` is keyed by `shape_bucket(tokens per call)`.
from kernels.common import shape_bucket  # pylint: disable=unused-import


@dataclasses.dataclass(frozen=True)
class GatedDeltaBlockSizes:
  """Tiling of the gated-delta state kernel.

  Attributes:
    block_v: value columns of the state per program, or None for all V. The columns of the
      state evolve independently, so the sequential kernel runs B * H * V / block_v programs.
      Power of two >= 8.
    block_r: reading queries per step of the fused ARL2 read. Power of two >= 8.
    max_tokens: TPU only: the most tokens of one (batch, head) -- written tokens plus reading
      queries -- one call of the state kernel may hold in VMEM, or None for no limit. The API
      routes longer sequences to the XLA chunked path when implementation=None; an explicit
      "pallas" raises. The GPU (Triton) kernel streams from HBM and ignores it.
    num_warps, num_stages: Triton launch parameters (GPU only); None lets Pallas choose.
  """
  block_v: int | None = 64
  block_r: int = 64
  max_tokens: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None

  def __post_init__(self):
    if self.block_v is not None and (
        not common.is_power_of_two(self.block_v) or self.block_v < 8):
      raise ValueError(f'block_v={self.block_v!r} must be None or a power of two >= 8')
    if not common.is_power_of_two(self.block_r) or self.block_r < 8:
      raise ValueError(f'block_r={self.block_r!r} must be a power of two >= 8')
    if self.max_tokens is not None and (
        not isinstance(self.max_tokens, int) or self.max_tokens <= 0):
      raise ValueError(f'max_tokens={self.max_tokens!r} must be None or a positive integer')
    for name in ('num_warps', 'num_stages'):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value <= 0):
        raise ValueError(f'{name}={value!r} must be None or a positive integer')


DEFAULTS = {
    'gpu': GatedDeltaBlockSizes(block_v=64, block_r=64, num_warps=4, num_stages=2),
    # Mosaic wants the minor block dim to be 128 lanes or the whole V. max_tokens: at K = V =
    # 128 a written token holds W, U0 and k rows (~1.3 KB in fp32) and a reading query its q
    # and read rows (~0.5-1 KB), double-buffered, so 16384 tokens is ~30 MB; whether that
    # fits depends on the TPU generation and Mosaic's scoped-VMEM limit (not raised here). It
    # admits the sampler's ARL2 step at paper scale (4680 written + 4680 reading) and sends
    # teacher forcing (7 x (4680 + 2 x 4680)) to XLA. An estimate, not a measurement: the
    # kernel has not been compiled on a TPU yet.
    'tpu': GatedDeltaBlockSizes(block_v=None, block_r=128, max_tokens=16384),
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


def get_block_sizes(dtype, num_tokens, *, device=None, interpret=False):
  """Block sizes for `device` (default: the first local device), dtype and token count."""
  return common.lookup_block_sizes(TUNED, DEFAULTS, dtype, num_tokens, device=device,
                                   interpret=interpret)
