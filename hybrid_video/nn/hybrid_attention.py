"""The ARL2 hybrid attention layer (method doc §3).

Shared W_q, W_k, W_v, W_o and q/k RMSNorm with the softmax layer, then two branches:

  intra_t = softmax attention of token t over the L tokens of its own chunk (RoPE on q, k)
  q_g = L2Norm(RoPE(phi_q q)),  k_g = L2Norm(RoPE(phi_k k)),  v_g = phi_v v
  inter_t = D^-1/2 * q_g,t . S_{n-1}              (block-level read of the pre-update state)
  S_n = GDN_scan(S_{n-1}; k_g, v_g, g, beta)       (clean context pass only)
  y_t = W_o concat_h(intra_t + sigmoid(x_t W_gate) * inter_t)

with g_t = -exp(A_log) softplus(x_t W_a + dt_bias) <= 0 and beta_t = 2 sigmoid(x_t W_b).
The state S is stored K-first: h = S^T in R^{D_k x D_v}, fp32. No K/V cache is kept.

Optional memory-branch LoRA (conversion stage 2, `hybrid_video/nn/lora.py`): the memory branch then
uses norm_q(W_q x + b_q + dq(x)) (and likewise k, v) in place of the shared q, k, v, while the
intra branch keeps the shared projections.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from hybrid_video.nn.attention import QKVProjection
from hybrid_video.config_checks import MEMORY_READS
from hybrid_video.errors import UserError
from hybrid_video import kernel_calls
from hybrid_video.nn.embeddings import apply_rope
from hybrid_video.nn.lora import LoRA

GATE_GAIN = 2.0 ** -2.5


def _l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _a_log_init(key, shape, dtype=jnp.float32):
  """A ~ U(0, 16), A_log = log A (Gated DeltaNet)."""
  a = jax.random.uniform(key, shape, jnp.float32, minval=0.0, maxval=16.0)
  return jnp.log(jnp.maximum(a, 1e-6)).astype(dtype)


def _dt_bias_init(key, shape, dtype=jnp.float32, dt_min=1e-3, dt_max=1e-1, dt_floor=1e-4):
  """dt ~ logU(dt_min, dt_max) clamped >= dt_floor; dt_bias = inverse softplus(dt)."""
  u = jax.random.uniform(key, shape, jnp.float32)
  dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
  dt = jnp.maximum(dt, dt_floor)
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


class HybridAttention(QKVProjection):
  """ARL2 layer: intra-chunk softmax + gated-delta memory of earlier chunks."""

  def __init__(self, dim, num_heads, eps, *, rngs, dtype=None, attention_impl=None,
               memory_impl=None, gdn_chunk_size: int = 64, read: str = "block",
               write_during_denoising: bool = False, memory_lora_rank: int = 0,
               memory_lora_alpha: float = 32.0, memory_lora_init: str = "peft",
               interpret: bool = False):
    super().__init__(dim, num_heads, eps, rngs=rngs, dtype=dtype)
    if read not in MEMORY_READS:
      raise UserError(f"model.memory.read={read!r} must be one of {MEMORY_READS}")
    h, d = self.num_heads, self.head_dim
    self.read_mode = read
    self.write_during_denoising = bool(write_during_denoising)
    self.attention_impl = attention_impl
    self.memory_impl = memory_impl
    self.gdn_chunk_size = gdn_chunk_size
    self.interpret = bool(interpret)  # Pallas interpret mode (CPU tests of the kernels)
    eye = lambda: jnp.tile(jnp.eye(d, dtype=jnp.float32), (h, 1, 1))  # a fresh buffer each
    self.phi_q = nnx.Param(eye())
    self.phi_k = nnx.Param(eye())
    self.phi_v = nnx.Param(eye())
    xavier = nnx.initializers.variance_scaling(GATE_GAIN ** 2, "fan_avg", "uniform")
    gate = lambda: nnx.Linear(dim, h, use_bias=False, kernel_init=xavier, rngs=rngs)
    self.w_a, self.w_b, self.w_gate = gate(), gate(), gate()
    self.a_log = nnx.Param(_a_log_init(rngs.params(), (h,)))
    self.dt_bias = nnx.Param(_dt_bias_init(rngs.params(), (h,)))
    if memory_lora_rank:  # a data or a static attribute, decided once
      lora = lambda: LoRA(dim, dim, memory_lora_rank, memory_lora_alpha, rngs=rngs, dtype=dtype,
                          init=memory_lora_init)
      self.mem_q_lora, self.mem_k_lora, self.mem_v_lora = lora(), lora(), lora()
    else:
      self.mem_q_lora = self.mem_k_lora = self.mem_v_lora = None

  # -- pieces ------------------------------------------------------------------------------------

  def _phi(self, phi, x):
    return jnp.einsum("bthd,hde->bthe", x.astype(jnp.float32), phi[...].astype(jnp.float32))

  def memory_project(self, x):
    """The memory branch's q, k, v [B, T, H, D] (before phi): the shared projections plus the
    memory-branch LoRA deltas, added before the q/k RMSNorm."""
    q = self.heads(self.norm_q(self.q(x) + self.mem_q_lora(x)))
    k = self.heads(self.norm_k(self.k(x) + self.mem_k_lora(x)))
    return q, k, self.heads(self.v(x) + self.mem_v_lora(x))

  def branches(self, x, angles):
    """x [B, T, dim] -> dict of intra q/k/v (rotated) and memory q_g/k_g/v_g, each [B, T, H, D]."""
    q, k, v = self.project(x)
    qm, km, vm = (q, k, v) if self.mem_q_lora is None else self.memory_project(x)
    return {
        "q": apply_rope(q, angles), "k": apply_rope(k, angles), "v": v,
        "qg": _l2norm(apply_rope(self._phi(self.phi_q, qm), angles)),
        "kg": _l2norm(apply_rope(self._phi(self.phi_k, km), angles)),
        "vg": self._phi(self.phi_v, vm),
    }

  def write_gates(self, x):
    """x [B, T, dim] -> (g, beta) [B, T, H] in fp32; g <= 0 and beta in (0, 2)."""
    x = x.astype(jnp.float32)
    a = self.w_a(x).astype(jnp.float32) + self.dt_bias[...]
    g = -jnp.exp(self.a_log[...].astype(jnp.float32)) * jax.nn.softplus(a)
    beta = 2.0 * jax.nn.sigmoid(self.w_b(x).astype(jnp.float32))
    return g, beta

  def output_gate(self, x):
    """gamma [B, T, H] = sigmoid(x W_gate), one gate per token and head."""
    return jax.nn.sigmoid(self.w_gate(x).astype(jnp.float32))

  def fuse_heads(self, x, intra, inter):
    """intra + gamma * inter per head, before W_o: [B, T, H, D]."""
    gamma = self.output_gate(x)[..., None]
    return (intra.astype(jnp.float32) + gamma * inter).astype(intra.dtype)

  def fuse(self, x, intra, inter):
    return self.out(self.fuse_heads(x, intra, inter))

  def read(self, qg, state):
    """Block-level read: D^-1/2 q_g . h for every token. qg [B, T, H, K], state [B, H, K, V]."""
    scale = self.head_dim ** -0.5
    return jnp.einsum("bthk,bhkv->bthv", qg * scale, state,
                      precision=jax.lax.Precision.HIGHEST)

  def token_read(self, qg, kg, vg, g, beta, state):
    """Ablation memory.read="token": token t reads S_{n-1} advanced through the tokens before
    it (raster order) of its own pass. qg... [B, T, H, D] for one chunk per batch row,
    state [B, H, K, V]. Shifting k, v, g, beta right by one token turns the inclusive GDN
    output o_t = h_t^T q_t into the exclusive read q_t . h_{t-1}."""
    shift = lambda a: jnp.pad(a, [(0, 0), (1, 0)] + [(0, 0)] * (a.ndim - 2))[:, :-1]
    reads, _ = kernel_calls.gated_delta_rule(
        qg, shift(kg), shift(vg), shift(g), shift(beta), scale=self.head_dim ** -0.5,
        initial_state=state, chunk_size=self.gdn_chunk_size, implementation=self.memory_impl,
        interpret=self.interpret)
    return reads

  # -- forwards ----------------------------------------------------------------------------------

  def teacher_forcing(self, x_clean, x_noisy, angles, num_chunks: int):
    """Teacher-forcing forward over N chunks, x_* [B, N*L, dim] -> (y_clean, y_noisy).

    States are built from the clean chunks only; both copies of chunk n read S_{n-1}.
    """
    yc, yn = self.teacher_forcing_heads(x_clean, x_noisy, angles, num_chunks)
    return self.out(yc), self.out(yn)

  def teacher_forcing_heads(self, x_clean, x_noisy, angles, num_chunks: int):
    """`teacher_forcing` before W_o: (intra + gamma * inter) [B, N*L, H, D] for both copies."""
    p = self.teacher_forcing_parts(x_clean, x_noisy, angles, num_chunks)
    return (self.fuse_heads(x_clean, p["intra_clean"], p["inter_clean"]),
            self.fuse_heads(x_noisy, p["intra_noisy"], p["inter_noisy"]))

  def teacher_forcing_parts(self, x_clean, x_noisy, angles, num_chunks: int) -> dict:
    """The branches of the teacher-forcing forward before fusion (also used by diagnostics).

    Returns intra_* and inter_* [B, N*L, H, D] for both copies ("clean", "noisy"), and the clean
    write gates g [B, N*L, H] (log decay of the state writes).
    """
    b, t, _ = x_clean.shape
    n, l = num_chunks, t // num_chunks
    c, z = self.branches(x_clean, angles), self.branches(x_noisy, angles)
    chunked = lambda a: a.reshape(b, n, l, *a.shape[2:])
    intra_c = kernel_calls.chunk_local_attention(
        chunked(c["q"]), chunked(c["k"]), chunked(c["v"]), implementation=self.attention_impl,
        interpret=self.interpret)
    intra_n = kernel_calls.chunk_local_attention(
        chunked(z["q"]), chunked(z["k"]), chunked(z["v"]), implementation=self.attention_impl,
        interpret=self.interpret)
    if self.write_during_denoising:
      raise UserError("model.memory.write_during_denoising has no teacher-forcing form: it is "
                      "a sampling-time ablation; train with it off")
    g, beta = self.write_gates(x_clean)
    q_read = jnp.concatenate([chunked(c["qg"]), chunked(z["qg"])], axis=2)  # [B, N, 2L, H, K]
    reads, prev_states, _ = kernel_calls.arl2_memory(
        q_read, chunked(c["kg"]), chunked(c["vg"]), chunked(g), chunked(beta),
        initial_state=None, scale=self.head_dim ** -0.5, chunk_size=self.gdn_chunk_size,
        implementation=self.memory_impl,
        interpret=self.interpret)
    flat = lambda a: a.reshape(b, t, *a.shape[3:])
    if self.read_mode == "block":
      inter_c, inter_n = flat(reads[:, :, :l]), flat(reads[:, :, l:])
    else:  # every chunk of both copies starts from its own S_{n-1}: fold chunks into batch
      per_chunk = lambda a: a.reshape(b * n, l, *a.shape[2:])
      states = prev_states.reshape(b * n, *prev_states.shape[2:])
      g_n, beta_n = self.write_gates(x_noisy)
      inter_c, inter_n = (
          self.token_read(per_chunk(br["qg"]), per_chunk(br["kg"]), per_chunk(br["vg"]),
                          per_chunk(gg), per_chunk(bb), states).reshape(b, t, *c["vg"].shape[2:])
          for br, gg, bb in ((c, g, beta), (z, g_n, beta_n)))
    return {"intra_clean": intra_c.reshape(b, t, *intra_c.shape[3:]), "inter_clean": inter_c,
            "intra_noisy": intra_n.reshape(b, t, *intra_n.shape[3:]), "inter_noisy": inter_n,
            "g": g}

  def step(self, x, angles, state, write: bool):
    """One chunk. x [B, L, dim], state [B, H, K, V] fp32 = S_{n-1}.

    Denoising passes only read the state (unless the memory.write_during_denoising ablation is
    on); the context pass (write=True) also returns S_n.
    """
    br = self.branches(x, angles)
    one = lambda a: a[:, None]
    intra = kernel_calls.chunk_local_attention(
        one(br["q"]), one(br["k"]), one(br["v"]), implementation=self.attention_impl,
        interpret=self.interpret)[:, 0]
    update = write or self.write_during_denoising
    if update or self.read_mode == "token":
      g, beta = self.write_gates(x)
    if self.read_mode == "token":
      inter = self.token_read(br["qg"], br["kg"], br["vg"], g, beta, state)
    if update:
      reads, _, new_state = kernel_calls.arl2_memory(
          one(br["qg"]), one(br["kg"]), one(br["vg"]), one(g), one(beta),
          initial_state=state, scale=self.head_dim ** -0.5, chunk_size=self.gdn_chunk_size,
          implementation=self.memory_impl, interpret=self.interpret)
      if self.read_mode == "block":
        inter = reads[:, 0]
      state = new_state
    elif self.read_mode == "block":
      inter = self.read(br["qg"], state)
    return self.fuse(x, intra, inter), state
