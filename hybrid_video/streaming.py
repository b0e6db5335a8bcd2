"""The per-chunk jitted functions of streaming, driven from the host.

`ChunkRunner` holds, for one model, sampler config and chunk shape:

  generate(carry, key, context) -> (carry, frames)   # the sampler's per-chunk step
                                                     # (hybrid_video.diffusion.sample_chunk_fn)
  feed(carry, frames, context) -> carry              # context pass at t = 0 on a given clean
                                                     # chunk: writes K/V and S_n (teacher forcing)
  continue_from(frames, num_chunks, key, context)    # feed whole chunks, then generate

The carry is donated to both. Unbounded softmax caches double when full (`reserve`), so each
capacity compiles once; `capacities(num_chunks)` lists them so callers can warm them up.
`StreamingSampler` (hybrid_video/sample.py) adds the whole-video loop; the benchmark drives
chunks itself to interleave policies, the evaluations feed true frames first.

With a mesh the parameters and carry are sharded (GDN states over heads, K/V caches over heads
and context) and generate is jitted with explicit in/out shardings per capacity.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from hybrid_video import sharding as sharding_lib
from hybrid_video.diffusion import sample_chunk_fn
from hybrid_video.flop_count import matmul_flops
from hybrid_video.model import CausalDiT, Carry, grow_carry


class ChunkRunner:
  """Jitted per-chunk generate / feed functions for one model, sampler config and chunk shape."""

  def __init__(self, model: CausalDiT, scfg, *, batch: int, frame_hw, mesh=None, rules=None):
    """mesh/rules: shard parameters and carry and jit with explicit shardings; None runs on
    the default device."""
    self.model = model
    self.scfg = scfg
    self.mesh = mesh
    self.rules = rules if rules is not None else dict(sharding_lib.DEFAULT_RULES)
    self.batch = int(batch)
    self.frame_hw = tuple(int(s) for s in frame_hw)
    model.chunk_grid(self.frame_hw)  # validates the frame size
    self.chunk_shape = (self.batch, model.frames_per_chunk, *self.frame_hw, model.out_channels)
    self.graphdef, self.state = nnx.split(model)
    if mesh is not None:
      self.state = jax.device_put(self.state, sharding_lib.named(
          mesh, sharding_lib.param_specs(self.state, self.rules, mesh)))
    self.generate_traces: list = []
    self.feed_traces: list = []
    self._chunk_fn = sample_chunk_fn(self.graphdef, scfg, self.chunk_shape, self.generate_traces)
    self._generate_jits: dict[int, Callable] = {}  # one per cache capacity
    self._steps: dict[int, Callable] = {}          # the same, under the activation sharding
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

  # -- placement ---------------------------------------------------------------------------------

  def _carry_shardings(self, carry):
    return sharding_lib.named(self.mesh, sharding_lib.carry_specs(carry, self.rules, self.mesh))

  def _place(self, carry):
    return carry if self.mesh is None else jax.device_put(carry, self._carry_shardings(carry))

  def init_carry(self, capacity: int | None = None) -> Carry:
    cap = self.initial_capacity() if capacity is None else capacity
    return self._place(self.model.init_carry(self.batch, self.frame_hw, cap))

  def reserve(self, carry: Carry, chunk_index: int) -> Carry:
    """The carry, grown by doubling until chunk `chunk_index` has a cache slot."""
    if not self.grows:
      return carry
    capacity = carry["slot_chunk"].shape[0]
    target = capacity
    while chunk_index >= target:
      target *= 2
    return self._place(grow_carry(carry, target)) if target > capacity else carry

  def embed(self, cond) -> jax.Array:
    """Conditioning tokens [B, M, dim] for `cond` (labels [B, M], embeddings or None)."""
    if self.mesh is not None and cond is not None:
      cond = jax.device_put(cond, NamedSharding(self.mesh, P()))
    return self._embed(self.state, cond)

  def prepare(self, seed: int, cond=None):
    """(key, context) for a stream, placed on the mesh (replicated) when there is one."""
    key = jax.random.key(seed)
    if self.mesh is not None:
      key = jax.device_put(key, NamedSharding(self.mesh, P()))
    return key, self.embed(cond)

  # -- the jitted steps --------------------------------------------------------------------------

  def _generate_jit(self, carry) -> Callable:
    capacity = carry["slot_chunk"].shape[0]
    if capacity not in self._generate_jits:
      if self.mesh is None:
        jitted = jax.jit(self._chunk_fn, donate_argnums=(1,))
      else:
        carry_sh = self._carry_shardings(carry)
        state_sh = jax.tree.map(lambda x: x.sharding, self.state)
        frames_sh = NamedSharding(self.mesh, sharding_lib.batch_spec(
            self.rules, self.mesh, self.chunk_shape))
        jitted = jax.jit(self._chunk_fn, donate_argnums=(1,),
                         in_shardings=(state_sh, carry_sh, None, None),
                         out_shardings=(carry_sh, frames_sh))
      self._generate_jits[capacity] = jitted
    return self._generate_jits[capacity]

  def step_fn(self, carry) -> Callable:
    """The jitted `(state, carry, key, context) -> (carry, frames)` for this carry's capacity
    (built once per capacity: this is the per-chunk hot path)."""
    capacity = carry["slot_chunk"].shape[0]
    if capacity not in self._steps:
      jitted, mesh, rules = self._generate_jit(carry), self.mesh, self.rules

      def step(state, carry, key, context):
        with sharding_lib.activation_sharding(mesh, rules):
          return jitted(state, carry, key, context)

      self._steps[capacity] = step
    return self._steps[capacity]

  def generate(self, carry: Carry, key, context):
    """Denoise one new chunk from noise, then write it (context pass). -> (carry, frames)."""
    return self.step_fn(carry)(self.state, carry, key, context)

  def feed(self, carry: Carry, frames, context) -> Carry:
    """Write a given clean chunk frames [B, F, H, W, C] in [-1, 1] (t = 0 context pass)."""
    with sharding_lib.activation_sharding(self.mesh, self.rules):
      return self._feed(self.state, carry, jnp.asarray(frames, jnp.float32), context)

  def continue_from(self, frames, num_chunks: int, key, context, *,
                    on_chunk: Callable[[], None] | None = None) -> np.ndarray:
    """Feed `frames` [B, k*F, H, W, C] in [-1, 1] (whole chunks) by context passes, then
    generate `num_chunks` chunks with `key`. Returns float [B, num_chunks*F, H, W, C] in [-1, 1].
    on_chunk is called after every fed or generated chunk (progress bars)."""
    f = self.model.frames_per_chunk
    frames = np.asarray(frames, np.float32)
    if frames.shape[1] % f:
      raise ValueError(f"{frames.shape[1]} context frames are not whole chunks of {f}")
    fed = frames.shape[1] // f
    carry, out = self.init_carry(), []
    for n in range(fed):
      carry = self.feed(self.reserve(carry, n), frames[:, n * f:(n + 1) * f], context)
      if on_chunk is not None:
        on_chunk()
    for j in range(num_chunks):
      carry, x0 = self.generate(self.reserve(carry, fed + j), key, context)
      out.append(np.asarray(x0))
      if on_chunk is not None:
        on_chunk()
    return np.concatenate(out, axis=1)

  def generate_analysis(self, carry: Carry, key, context) -> tuple[dict, dict]:
    """(memory, cost) of the generate executable for this carry's shapes: XLA's memory and
    cost analyses, plus `matmul_flops` counted from the traced step with every loop trip
    (hybrid_video/flop_count.py; XLA's `flops` counts a loop body once).

    Traces and compiles on the first call for a shape; the jitted call reuses both.
    """
    with sharding_lib.activation_sharding(self.mesh, self.rules):
      traced = self._generate_jit(carry).trace(self.state, carry, key, context)
      compiled = traced.lower().compile()
    cost = cost_analysis_dict(compiled)
    cost["matmul_flops"] = matmul_flops(traced.jaxpr)
    return memory_analysis_dict(compiled.memory_analysis()), cost


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
