"""Chunk-level streaming driven from the host, for the benchmark and the evaluation.

`StreamingSampler.stream` runs a whole video; the benchmark needs each chunk on its own (to
interleave policies and time them) and the evaluation needs to feed given clean frames first.
`ChunkRunner` holds, for one model and chunk shape, the jitted functions both use:

  generate(carry, key, context) -> (carry, frames)   # the sampler's per-chunk step
                                                     # (hybrid_video.diffusion.sample_chunk_fn)
  feed(carry, frames, context) -> carry              # context pass at t = 0 on a given clean
                                                     # chunk: writes K/V and S_n (teacher forcing)

The carry is donated to both. Unbounded softmax caches double when full, as in the sampler, so
each capacity compiles once; `capacities(num_chunks)` lists them so callers can warm them up.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_video.diffusion import sample_chunk_fn
from hybrid_video.model import CausalDiT, Carry, grow_carry


class ChunkRunner:
  """Jitted per-chunk generate / feed functions for one model, sampler config and chunk shape."""

  def __init__(self, model: CausalDiT, scfg, *, batch: int, frame_hw):
    self.model = model
    self.scfg = scfg
    self.batch = int(batch)
    self.frame_hw = tuple(int(s) for s in frame_hw)
    model.chunk_grid(self.frame_hw)  # validates the frame size
    self.chunk_shape = (self.batch, model.frames_per_chunk, *self.frame_hw, model.out_channels)
    self.graphdef, self.state = nnx.split(model)
    self.generate_traces: list = []
    self.feed_traces: list = []
    self._generate = jax.jit(
        sample_chunk_fn(self.graphdef, scfg, self.chunk_shape, self.generate_traces),
        donate_argnums=(1,))
    self._feed = jax.jit(self._feed_fn, donate_argnums=(1,))
    self._embed = jax.jit(lambda state, cond: nnx.merge(self.graphdef, state).embed_condition(
        cond, self.batch))

  def _feed_fn(self, state, carry, frames, context):
    self.feed_traces.append(1)  # runs once per trace: counts compiles
    model = nnx.merge(self.graphdef, state)
    t = jnp.zeros((frames.shape[0],), jnp.float32)
    _, carry = model.step(frames.astype(jnp.float32), t, context, carry, write=True)
    return carry

  @property
  def compiles(self) -> int:
    """Executables built so far for generate (one per cache capacity)."""
    return len(self.generate_traces)

  @property
  def grows(self) -> bool:
    """True when the carry grows: softmax layers with an unbounded cache."""
    return bool(self.model.softmax_layers) and not self.model.bounded_cache

  def initial_capacity(self) -> int:
    return self.model.cache_capacity(int(self.scfg.cache_chunks))

  def capacities(self, num_chunks: int) -> list[int]:
    """Cache capacities (chunks) a stream of `num_chunks` chunks goes through, in order."""
    cap = self.initial_capacity()
    caps = [cap]
    while self.grows and cap < num_chunks:
      cap *= 2
      caps.append(cap)
    return caps

  def init_carry(self, capacity: int | None = None) -> Carry:
    cap = self.initial_capacity() if capacity is None else capacity
    return self.model.init_carry(self.batch, self.frame_hw, cap)

  def reserve(self, carry: Carry, chunk_index: int) -> Carry:
    """The carry, grown by doubling until chunk `chunk_index` has a cache slot."""
    if not self.grows:
      return carry
    capacity = carry["slot_chunk"].shape[0]
    target = capacity
    while chunk_index >= target:
      target *= 2
    return grow_carry(carry, target) if target > capacity else carry

  def embed(self, cond) -> jax.Array:
    """Conditioning tokens [B, M, dim] for `cond` (labels [B, M], embeddings or None)."""
    return self._embed(self.state, cond)

  def generate(self, carry: Carry, key, context):
    """Denoise one new chunk from noise, then write it (context pass). -> (carry, frames)."""
    return self._generate(self.state, carry, key, context)

  def feed(self, carry: Carry, frames, context) -> Carry:
    """Write a given clean chunk frames [B, F, H, W, C] in [-1, 1] (t = 0 context pass)."""
    return self._feed(self.state, carry, jnp.asarray(frames, jnp.float32), context)

  def generate_analysis(self, carry: Carry, key, context) -> tuple[dict, dict]:
    """XLA's (memory, cost) analyses of the generate executable for this carry's shapes.

    Compiles on the first call for a shape; the jitted call then reuses the executable.
    """
    compiled = self._generate.lower(self.state, carry, key, context).compile()
    return memory_analysis_dict(compiled.memory_analysis()), cost_analysis_dict(compiled)


def cost_analysis_dict(compiled) -> dict[str, float]:
  """flops, transcendentals and bytes accessed that XLA counts for one call ({} if unknown)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every back-end implements it
    return {}
  if isinstance(cost, (list, tuple)):  # older jax: one dict per device
    cost = cost[0] if cost else {}
  return {k.replace(" ", "_"): float(cost[k]) for k in ("flops", "transcendentals",
                                                        "bytes accessed") if k in (cost or {})}


def memory_analysis_dict(stats) -> dict[str, int]:
  """Byte counts of a CompiledMemoryStats; `footprint` = arguments + outputs - aliased + temps,
  the executable's peak of live buffers (parameters, carry, activations)."""
  if stats is None:
    return {}
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
  out = {f.replace("_size_in_bytes", ""): int(getattr(stats, f, 0) or 0) for f in fields}
  out["footprint"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out
