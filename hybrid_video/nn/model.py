"""The causal Wan-style video DiT with softmax and ARL2 hybrid layers (method doc §2–§6).

Two forwards share every parameter:
- `teacher_forcing(clean, noisy, t, cond)`: one parallel pass over [clean chunks ; noisy chunks]
  (training);
- `step(x, t, context, carry, write)`: one chunk against the carry (streaming sampler). The carry
  holds each softmax layer's K/V cache and each hybrid layer's state S [B, H, D, D] (fp32).

Shapes: video [B, T, Hi, Wi, C]; F frames per chunk; after patchify Tp = T/pt latent token
frames, N = Hp*Wp tokens per frame, L = Fp*N tokens per chunk.
"""

from __future__ import annotations

from hybrid_video.errors import UserError

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_video import axes as ax
from hybrid_video.nn.blocks import Block, modulate
from hybrid_video.sharding import constrain
from hybrid_video.nn.embeddings import (ConditionEmbed, PatchEmbed, TimeEmbed, rope_angles,
                                     unpatchify)

Carry = dict[str, Any]

# What the head predicts: "velocity" (eps - x0, Wan and every imported model) or "x0" (the clean
# video; the model still returns the velocity (x_t - x0_hat) / t, so losses, samplers and
# conversion are unchanged). x0 suits pixel-space models whose patches are large against the
# width: clean frames lie near a low-dimensional set, noise does not (Li & He 2025, "Back to
# Basics: Let Denoising Generative Models Denoise").
PREDICTIONS = ("velocity", "x0")
X0_MIN_T = 0.05  # the division by t is clipped here (as in Li & He): at t -> 0 the velocity
#                  is ill-defined and the sampler's last step reads x0_hat directly


def resolve_hybrid_layers(num_layers: int, layers: Sequence[int] | None = None,
                          ratio: float | None = 0.75) -> tuple[int, ...]:
  """Which blocks are hybrid: an explicit list wins; otherwise the earliest round(ratio*layers)."""
  if layers is not None:
    layers = tuple(int(i) for i in layers)
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
      raise UserError(f"hybrid layer indices {bad} are out of range for {num_layers=} "
                       f"(valid: 0..{num_layers - 1})")
    if len(set(layers)) != len(layers):
      raise UserError(f"hybrid layer indices {list(layers)} contain duplicates")
    return tuple(sorted(layers))
  ratio = 0.0 if ratio is None else float(ratio)
  if not 0.0 <= ratio <= 1.0:
    raise UserError(f"hybrid ratio {ratio} must be in [0, 1]")
  return tuple(range(int(round(ratio * num_layers))))


class CausalDiT(nnx.Module):
  """Chunk-autoregressive DiT. `cfg` is the `model` ConfigDict of configs/default.py."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.patch_size = tuple(int(p) for p in cfg.patch_size)
    self.frames_per_chunk = int(cfg.frames_per_chunk)
    if self.frames_per_chunk <= 0 or self.frames_per_chunk % self.patch_size[0]:
      raise UserError(f"model.frames_per_chunk={self.frames_per_chunk} must be a positive "
                       f"multiple of the temporal patch {self.patch_size[0]}")
    self.in_channels = int(cfg.in_channels)
    self.out_channels = int(cfg.out_channels)
    self.dim = int(cfg.dim)
    self.num_heads = int(cfg.num_heads)
    self.head_dim = self.dim // self.num_heads
    self.rope_theta = float(cfg.rope_theta)
    self.prediction = str(cfg.get("prediction", "velocity") or "velocity")
    if self.prediction not in PREDICTIONS:
      raise UserError(f"model.prediction={self.prediction!r}: choose {', '.join(PREDICTIONS)}")
    # The softmax layers' K/V caches hold K and V as the projections give them: in the compute
    # dtype (bf16 in the Wan configs; the values are the same as an fp32 cache would hold).
    self.cache_dtype = jnp.dtype(cfg.get("dtype") or "float32")
    self.remat = bool(cfg.get("remat", False))
    self.remat_policy = str(cfg.get("remat_policy", "nothing") or "nothing")
    self.scan_layers = bool(cfg.get("scan_layers", False))
    if self.remat_policy not in REMAT_POLICIES:
      raise UserError(f"model.remat_policy={self.remat_policy!r}: choose "
                      f"{', '.join(REMAT_POLICIES)}")
    self.sink_chunks = int(cfg.kv_cache.sink_chunks)
    self.window_chunks = int(cfg.kv_cache.window_chunks)
    if self.window_chunks < 0 or self.sink_chunks < 0:
      raise UserError("model.kv_cache.sink_chunks and window_chunks must be >= 0")
    self.hybrid_layers = resolve_hybrid_layers(cfg.num_layers, cfg.hybrid.layers,
                                               cfg.hybrid.ratio)
    self.patch_embed = PatchEmbed(cfg.in_channels, cfg.dim, self.patch_size, rngs=rngs)
    self.time_embed = TimeEmbed(cfg.freq_dim, cfg.dim, rngs=rngs)
    null_label = bool(cfg.get("null_label", False)) and cfg.cond == "labels"
    # The label index that means "no label" (classifier-free guidance), or None.
    self.null_label_index = int(cfg.num_classes) if null_label else None
    self.cond_embed = ConditionEmbed(cfg.cond, cfg.num_classes, cfg.text_dim, cfg.dim, rngs=rngs,
                                     null_label=null_label,
                                     label_tokens=int(cfg.get("label_tokens", 1)))
    # model.label_adaln (labels only): the label token also joins the timestep embedding, so it
    # modulates every block's norms (adaLN, as in class-conditional DiT) besides the
    # cross-attention. Zero-initialised: at init the model equals one without it.
    self.label_to_time = nnx.data(None)
    if bool(cfg.get("label_adaln", False)) and cfg.cond == "labels":
      self.label_to_time = nnx.data(nnx.Linear(
          cfg.dim, cfg.dim, kernel_init=nnx.initializers.zeros_init(), rngs=rngs))
    self.blocks = nnx.List([self._block(cfg, i, rngs) for i in range(cfg.num_layers)])
    self.head_norm = nnx.LayerNorm(cfg.dim, epsilon=cfg.eps, use_bias=False, use_scale=False,
                                   rngs=rngs)
    self.head_modulation = nnx.Param(jax.random.normal(rngs.params(), (1, 2, cfg.dim))
                                     / cfg.dim ** 0.5)
    self.head = nnx.Linear(cfg.dim, math.prod(self.patch_size) * cfg.out_channels,
                           kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

  def _block(self, cfg, i: int, rngs) -> Block:
    if isinstance(rngs, CountingRngs):  # where block i's keys start (weights import, see there)
      rngs.block_starts.append(rngs.count)
    return Block(cfg, i in self.hybrid_layers, rngs=rngs)

  # -- shared pieces -----------------------------------------------------------------------------

  @property
  def bounded_cache(self) -> bool:
    return self.window_chunks > 0

  @property
  def softmax_layers(self) -> tuple[int, ...]:
    return tuple(i for i in range(len(self.blocks)) if i not in self.hybrid_layers)

  def check_video(self, video_shape, *, what: str = "video"):
    """Clear errors for shapes the model cannot take. video_shape = (B, T, Hi, Wi, C)."""
    if len(video_shape) != 5:
      raise UserError(f"{what} must be [B, T, H, W, C], got shape {tuple(video_shape)}")
    _, t, h, w, c = video_shape
    pt, ph, pw = self.patch_size
    if h % ph or w % pw:
      raise UserError(f"frame size {h}x{w} is not divisible by the patch size {ph}x{pw}")
    if c != self.in_channels:
      raise UserError(f"{what} has {c} channels, the model expects {self.in_channels}")
    if t % self.frames_per_chunk:
      raise UserError(f"frames_per_chunk={self.frames_per_chunk} does not divide the clip "
                       f"length {t}")

  def _frame_times(self, t, batch: int, num_chunks: int, frames_per_chunk: int) -> jax.Array:
    """t [B, num_chunks] (per chunk) or [B, num_chunks * Fp] (per frame) -> [B, Tp] fp32."""
    t = jnp.asarray(t, jnp.float32)
    if t.shape == (batch, num_chunks):
      return jnp.repeat(t, frames_per_chunk, axis=1)
    if t.shape == (batch, num_chunks * frames_per_chunk):
      return t
    raise UserError(f"t has shape {t.shape}, expected (B, num_chunks) = {(batch, num_chunks)} "
                    f"or (B, latent frames) = {(batch, num_chunks * frames_per_chunk)}")

  def embed_condition(self, cond, batch: int) -> jax.Array:
    """Conditioning tokens [B, M, dim] (computed once per video by the sampler)."""
    return self.cond_embed(cond, batch)

  def _label_time(self, context) -> jax.Array | None:
    """The conditioning's term of the timestep embedding [B, dim] (model.label_adaln), or None."""
    if self.label_to_time is None:
      return None
    return self.label_to_time(jnp.mean(context.astype(jnp.float32), axis=1))

  def null_condition(self, batch: int) -> jax.Array:
    """Conditioning tokens [B, label_tokens, dim] of the null label (classifier-free guidance)."""
    if self.null_label_index is None:
      raise UserError("this model has no null label (model.null_label)")
    return self.embed_condition(jnp.full((batch, 1), self.null_label_index, jnp.int32), batch)

  def _tokens(self, video):
    x = self.patch_embed(video)  # [B, Tp, Hp, Wp, dim]
    b, tp, hp, wp, d = x.shape
    return x.reshape(b, tp * hp * wp, d), (tp, hp, wp)

  def _head(self, x, e, grid, x_t, t_frames):
    """x [B, Tp*N, dim], e [B, Tp, dim] -> the flow velocity [B, T, Hi, Wi, C_out].

    With prediction="x0" the head's output is the clean video x0_hat, turned into the velocity
    (x_t - x0_hat) / max(t, X0_MIN_T) for the noisy input x_t at noise levels t_frames [B, Tp]."""
    m = self.head_modulation[...].astype(jnp.float32)[:, None] + e[:, :, None].astype(jnp.float32)
    out = self.head(modulate(self.head_norm(x), m[:, :, 0], m[:, :, 1]))
    tp, hp, wp = grid
    out = out.reshape(out.shape[0], tp, hp, wp, out.shape[-1])
    out = unpatchify(out, self.patch_size, self.out_channels)
    if self.prediction == "velocity":
      return out
    t = jnp.repeat(jnp.maximum(t_frames, X0_MIN_T), self.patch_size[0], axis=1)
    t = t.reshape(*t.shape, 1, 1, 1)
    return ((x_t.astype(jnp.float32) - out.astype(jnp.float32)) / t).astype(out.dtype)

  # -- teacher forcing ---------------------------------------------------------------------------

  def teacher_forcing(self, clean, noisy, t, cond=None):
    """Parallel training forward (method doc §6).

    clean, noisy [B, T, Hi, Wi, C] (T = N*F); t in [0, 1] (1000 t is Wan's timestep): [B, N] one
    noise level per noisy chunk, or [B, Tp] one per latent token frame (Causal-Forcing's
    per-frame timesteps; Tp = T / pt); cond: labels [B, M], embeddings [B, M, text_dim] or None.
    Returns the prediction (flow velocity) for the noisy chunks, [B, T, Hi, Wi, C_out].
    """
    self.check_video(clean.shape, what="clean video")
    if noisy.shape != clean.shape:
      raise UserError(f"noisy shape {noisy.shape} differs from clean shape {clean.shape}")
    b, frames = clean.shape[:2]
    num_chunks = frames // self.frames_per_chunk
    xc, grid = self._tokens(clean)
    xn, _ = self._tokens(noisy)
    fp = self.frames_per_chunk // self.patch_size[0]
    t_frames = self._frame_times(t, b, num_chunks, fp)  # [B, Tp]
    context = self.embed_condition(cond, b)
    label = self._label_time(context)
    _, e0c = self.time_embed(jnp.zeros_like(t_frames), label)
    en, e0n = self.time_embed(t_frames, label)
    angles = rope_angles(0, grid[0], grid[1], grid[2], self.head_dim, self.rope_theta)

    def run_block(block, xc, xn):
      xc, xn = block.teacher_forcing(xc, xn, e0c, e0n, context, angles, num_chunks)
      return constrain(xc, ax.ACTIVATION), constrain(xn, ax.ACTIVATION)

    if self.remat:  # recompute block activations in the backward pass
      run_block = _rematerialised(run_block, REMAT_POLICIES[self.remat_policy])
    xc, xn = constrain(xc, ax.ACTIVATION), constrain(xn, ax.ACTIVATION)
    xc, xn = self._run_blocks(run_block, (xc, xn))
    return self._head(xn, en, grid, noisy, t_frames)

  def _run_blocks(self, run_block, xs):
    """xs through every block in order, `run_block(block, *xs) -> xs`.

    With model.scan_layers, each run of consecutive blocks of one structure (the hybrid
    layers, the softmax layers) is one `lax.scan` over their stacked parameters. XLA then
    compiles one block per run, and every buffer a block's backward needs lives inside one
    loop iteration: with the blocks unrolled, XLA:CPU's scheduler made the zero-initialised
    loop buffers of every layer's backward at the start of the step and held them across the
    forward pass (README, "Scaling out"). Stacking copies the run's parameters once per step.
    """
    blocks = list(self.blocks)
    if not self.scan_layers:
      for block in blocks:
        xs = run_block(block, *xs)
      return xs
    splits = [nnx.split(block) for block in blocks]
    start = 0
    while start < len(blocks):
      end = start + 1
      while end < len(blocks) and splits[end][0] == splits[start][0]:
        end += 1
      if end - start == 1:
        xs = run_block(blocks[start], *xs)
      else:
        graphdef = splits[start][0]
        stacked = stack_states([state for _, state in splits[start:end]])

        def body(xs, state, graphdef=graphdef):
          return tuple(run_block(nnx.merge(graphdef, state), *xs)), None

        xs, _ = jax.lax.scan(body, tuple(xs), stacked)
      start = end
    return xs

  # -- streaming ---------------------------------------------------------------------------------

  def chunk_grid(self, frame_hw) -> tuple[int, int, int]:
    h, w = frame_hw
    pt, ph, pw = self.patch_size
    if h % ph or w % pw:
      raise UserError(f"frame size {h}x{w} is not divisible by the patch size {ph}x{pw}")
    return self.frames_per_chunk // pt, h // ph, w // pw

  def cache_capacity(self, requested_chunks: int) -> int:
    """Slots of the K/V cache: sinks + window when bounded, else the requested count."""
    if self.bounded_cache:
      return self.sink_chunks + self.window_chunks
    return max(int(requested_chunks), 1)

  def init_carry(self, batch: int, frame_hw, capacity_chunks: int = 1,
                 cache_dtype=None) -> Carry:
    """Empty carry: zero states, empty K/V caches of `capacity_chunks` slots (see grow_carry) in
    `cache_dtype` (default: the model's compute dtype)."""
    cache_dtype = self.cache_dtype if cache_dtype is None else cache_dtype
    fp, hp, wp = self.chunk_grid(frame_hw)
    chunk_len = fp * hp * wp
    cap = self.cache_capacity(capacity_chunks) if self.softmax_layers else 0
    h, d = self.num_heads, self.head_dim
    layers = []
    for i in range(len(self.blocks)):
      if i in self.hybrid_layers:
        layers.append({"state": jnp.zeros((batch, h, d, d), jnp.float32)})
      else:
        shape = (batch, cap * chunk_len, h, d)  # k and v must be distinct buffers (donation)
        layers.append({"k": jnp.zeros(shape, cache_dtype), "v": jnp.zeros(shape, cache_dtype)})
    return {
        "layers": tuple(layers),
        "slot_chunk": jnp.full((cap,), -1, jnp.int32),  # chunk index held by each cache slot
        "chunk": jnp.zeros((), jnp.int32),               # index of the next chunk
    }

  def _write_slot(self, chunk):
    if not self.bounded_cache:
      return chunk
    s, w = self.sink_chunks, self.window_chunks
    return jnp.where(chunk < s + w, chunk, s + (chunk - s) % w)

  def step(self, x, t, context, carry: Carry, *, write: bool):
    """One chunk through the model.

    x [B, F, Hi, Wi, C]; t [B] noise level in [0, 1], or [B, Fp] one per latent token frame
    (Causal-Forcing's per-frame timesteps); context [B, M, dim] from embed_condition.
    Denoising passes (write=False) read the carry; the context pass (write=True, t = 0 on the
    clean chunk) writes K/V and S_n and advances the chunk counter.
    Returns (prediction [B, F, Hi, Wi, C_out], carry).
    """
    b = x.shape[0]
    fp, hp, wp = self.chunk_grid(x.shape[2:4])
    chunk_len = fp * hp * wp
    tokens, grid = self._tokens(x)
    chunk = carry["chunk"]
    angles = rope_angles(chunk * fp, fp, hp, wp, self.head_dim, self.rope_theta)
    t = jnp.asarray(t, jnp.float32)
    t_frames = self._frame_times(t[:, None] if t.ndim == 1 else t, b, 1, fp)  # [B, Fp]
    e, e0 = self.time_embed(t_frames, self._label_time(context))
    slot = self._write_slot(chunk)
    valid = jnp.repeat(carry["slot_chunk"] >= 0, chunk_len)
    cache_ctx = (valid, slot, chunk_len)

    def run_block(block, tokens, layer_carry):
      tokens, layer_carry = block.step(tokens, e0, context, angles, layer_carry, cache_ctx, write)
      return constrain(tokens, ax.ACTIVATION), layer_carry

    if self.remat:  # a step differentiated (conversion on rollouts) recomputes its blocks
      run_block = _rematerialised(run_block, REMAT_POLICIES[self.remat_policy])
    layers = []
    for block, layer_carry in zip(self.blocks, carry["layers"]):
      tokens, layer_carry = run_block(block, tokens, layer_carry)
      layers.append(layer_carry)
    out = self._head(tokens, e, grid, x, t_frames)
    if not write:  # caches and counter unchanged; states change only in the write ablation
      return out, {**carry, "layers": tuple(layers)}
    slot_chunk = carry["slot_chunk"]
    if slot_chunk.shape[0]:
      slot_chunk = slot_chunk.at[slot].set(chunk)
    return out, {"layers": tuple(layers), "slot_chunk": slot_chunk, "chunk": chunk + 1}


def grow_carry(carry: Carry, capacity_chunks: int) -> Carry:
  """Enlarge every softmax layer's K/V cache to `capacity_chunks` slots (new slots empty)."""
  old = carry["slot_chunk"].shape[0]
  if capacity_chunks <= old:
    return carry
  layers = []
  for lc in carry["layers"]:
    if "k" in lc:
      chunk_len = lc["k"].shape[1] // old
      pad = ((0, 0), (0, (capacity_chunks - old) * chunk_len), (0, 0), (0, 0))
      lc = {"k": jnp.pad(lc["k"], pad), "v": jnp.pad(lc["v"], pad)}
    layers.append(lc)
  slot_chunk = jnp.concatenate(
      [carry["slot_chunk"], jnp.full((capacity_chunks - old,), -1, jnp.int32)])
  return {"layers": tuple(layers), "slot_chunk": slot_chunk, "chunk": carry["chunk"]}


def carry_bytes(carry: Carry) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(carry))


def build_model(cfg, seed: int = 0) -> CausalDiT:
  return CausalDiT(cfg, rngs=nnx.Rngs(seed))


class ShapeOnlyRngs:
  """A key source for abstract construction only: one fixed key, no Rngs counter (tracing the
  counter's updates makes nnx.eval_shape quadratic in model size: 15 s at Wan scale)."""

  def __init__(self):
    self.key = jax.random.key(0)

  def __call__(self):
    return self.key

  def __getattr__(self, stream):  # rngs.params(), rngs.dropout(), ...
    if stream.startswith("_"):
      raise AttributeError(stream)
    return self


class CountingRngs(ShapeOnlyRngs):
  """The keys of `nnx.Rngs(seed)` (the n-th request, from any stream, gets
  fold_in(key(seed), n): every stream falls back to the default one) counted in Python. A model
  built with it under jit equals `CausalDiT(cfg, rngs=nnx.Rngs(seed))`, but tracing its
  constructor stays linear in model size (see ShapeOnlyRngs).

  CausalDiT records in `block_starts` the count at which each block's keys start, so one block
  can be rebuilt alone with the model's keys: `Block(cfg, ..., rngs=CountingRngs(seed, start))`
  (`start` may be traced).
  """

  def __init__(self, seed, start=0):
    self.key = jax.random.key(seed)
    self.count = start
    self.block_starts: list = []

  def __call__(self):
    key = jax.random.fold_in(self.key, self.count)
    self.count += 1
    return key


def stack_states(states):
  """Module states of one structure -> one state whose leaves gain a leading axis (the layer
  axis that a `lax.scan` over those modules walks)."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def _rematerialised(run_block, policy):
  """`run_block(block, *xs)` under jax.checkpoint, on the block's split state: a pure function
  of (state, xs), so parameters from any trace (frozen, trainable, LoRA, a teacher's) pass
  through as inputs. (nnx.remat writes the state back into the module after the call, which
  fails when the module merges parameters from two traces, as the conversion stages do.)"""
  def run(block, *xs):
    graphdef, state = nnx.split(block)
    pure = lambda state, *xs: run_block(nnx.merge(graphdef, state), *xs)
    return jax.checkpoint(pure, policy=policy)(state, *xs)
  return run


# model.remat_policy -> what a rematerialised block keeps from its forward pass.
REMAT_POLICIES = {
    "nothing": None,  # jax.checkpoint's default: keep only the block inputs, recompute the rest
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


def abstract_model(cfg) -> CausalDiT:
  """The model with ShapeDtypeStruct parameters (nothing allocated; shapes and structure only)."""
  try:
    return nnx.eval_shape(lambda: CausalDiT(cfg, rngs=ShapeOnlyRngs()))
  except (AttributeError, TypeError):  # a module that needs a real nnx.Rngs: slower, same shapes
    return nnx.eval_shape(lambda: CausalDiT(cfg, rngs=nnx.Rngs(0)))


def count_params(model: CausalDiT) -> int:
  state = nnx.state(model, nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def storage_dtype(path: tuple, dtype, weights_dtype: str):
  """bfloat16 storage covers the matrices (Linear kernels, phi, LoRA factors) except the time
  embedder's; biases, norms, modulation tables and the gates' A_log / dt_bias stay float32, as
  Wan keeps its modulation and norms in float32."""
  if weights_dtype == "float32" or not jnp.issubdtype(dtype, jnp.floating):
    return dtype
  if path[0] == "time_embed" or path[-1] not in ("kernel", "a", "b", "phi_q", "phi_k", "phi_v"):
    return dtype
  return jnp.bfloat16


def stored_params(params, weights_dtype: str):
  """`params` (arrays or ShapeDtypeStructs, an nnx.State) with the storage of `storage_dtype`:
  matrices in bfloat16 when weights_dtype is "bfloat16"; computation still runs in model.dtype
  (bf16 x fp32 promotes to fp32)."""
  flat = nnx.to_flat_state(params)

  def cast(path, x):
    dtype = storage_dtype(tuple(path), x.dtype, weights_dtype)
    if dtype == x.dtype:
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)

  return nnx.from_flat_state([(p, v.replace(cast(p, v.get_value()))) for p, v in flat])
