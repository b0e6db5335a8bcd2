"""The ARL2 hybrid layer against a float64 numpy oracle written from the method doc (§2, §3, §6).

The oracle shares no code with the layer: its own 3-D RoPE (Wan bands D - 4*(D//6), 2*(D//6),
2*(D//6), each with frequencies theta^(-2i/band), adjacent pairs rotated, positions
(frame, row, column) of each token in raster order), its own RMSNorm, phi -> RoPE -> L2, the
gates, the block read without decay, the token-by-token delta-rule write, gamma fusion and W_o.
Only the parameter values are taken from a project `HybridAttention`, randomised so that phi is
far from the identity and every gate far from trivial. The layer is fed the project's
`rope_angles` as its input, so RoPE positions are checked end to end.

Storage convention: phi is applied as x @ phi_h (the authors' grouped Conv1d weight is its
per-head transpose, a weight-import matter); the state is K-first, h = S^T [H, K, V].

Checked: teacher forcing (both the clean and the noisy copy) and streaming over 4 chunks
(denoising pass output, context-pass output, every written state). fp32 layer vs float64
oracle: max|a - b| / max|b| <= 1e-5 (the project's parity bar; measured ~1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from hybrid_video.nn.embeddings import rope_angles
from hybrid_video.nn.hybrid_attention import HybridAttention

B, DIM, HEADS = 2, 64, 2          # head dim D = 32: RoPE bands 12/10/10 (unequal on purpose)
F, GRID_H, GRID_W = 2, 3, 4       # L = 24 tokens per chunk
CHUNKS = 4
GDN_CHUNK = 16                    # L is not a multiple: the chunked write's ragged path runs
EPS = 1e-6
THETA = 10000.0
TOL = 1e-5


# ----------------------------------------------------------------------------------------------
# The oracle (float64 numpy), straight from the method doc.


def oracle_rope_rotate(x, frames, rows, cols, head_dim):
  """3-D RoPE: x [T, H, D]; positions of each token per axis [T]. Adjacent pairs (2i, 2i+1)."""
  d6 = head_dim // 6
  bands = (head_dim - 4 * d6, 2 * d6, 2 * d6)  # time, height, width dimensions
  angles = []
  for band, pos in zip(bands, (frames, rows, cols)):
    freqs = THETA ** (-np.arange(0, band, 2, dtype=np.float64) / band)  # band/2 frequencies
    angles.append(np.asarray(pos, np.float64)[:, None] * freqs[None, :])
  ang = np.concatenate(angles, axis=1)[:, None, :]  # [T, 1, D/2]
  x0, x1 = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  # (x0 + i x1) * exp(i ang), as Wan's complex multiply.
  out[..., 0::2] = x0 * np.cos(ang) - x1 * np.sin(ang)
  out[..., 1::2] = x0 * np.sin(ang) + x1 * np.cos(ang)
  return out


def oracle_positions(first_frame, num_frames):
  """(frame, row, col) of each token, frame-major then row then column."""
  f, r, c = np.meshgrid(np.arange(first_frame, first_frame + num_frames), np.arange(GRID_H),
                        np.arange(GRID_W), indexing="ij")
  return f.ravel(), r.ravel(), c.ravel()


def _rms(x, scale):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * scale


def _l2(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _softplus(x):
  return np.logaddexp(0.0, x)


class Oracle:
  """The hybrid layer of one batch row, x [T, dim] -> pieces, in float64."""

  def __init__(self, p):
    self.p = p
    self.h, self.d = p["phi_q"].shape[0], p["phi_q"].shape[1]

  def split(self, a):
    return a.reshape(a.shape[0], self.h, self.d)

  def project(self, x, positions):
    p = self.p
    q = self.split(_rms(x @ p["wq"] + p["bq"], p["sq"]))
    k = self.split(_rms(x @ p["wk"] + p["bk"], p["sk"]))
    v = self.split(x @ p["wv"] + p["bv"])
    rope = lambda a: oracle_rope_rotate(a, *positions, self.d)
    phi = lambda a, w: np.einsum("thd,hde->the", a, w)
    return {
        "q": rope(q), "k": rope(k), "v": v,
        "qg": _l2(rope(phi(q, p["phi_q"]))),  # phi, then RoPE, then L2
        "kg": _l2(rope(phi(k, p["phi_k"]))),
        "vg": phi(v, p["phi_v"]),
        "g": -np.exp(p["a_log"]) * _softplus(x @ p["wa"] + p["dt_bias"]),  # [T, H]
        "beta": 2.0 * _sigmoid(x @ p["wb"]),
        "gamma": _sigmoid(x @ p["wgate"]),
    }

  def intra(self, br):
    """Bidirectional softmax within the chunk: [L, H, D]."""
    s = np.einsum("ihd,jhd->hij", br["q"], br["k"]) / np.sqrt(self.d)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    return np.einsum("hij,jhd->ihd", s, br["v"])

  def read(self, br, h):
    """Block read without decay: D^-1/2 q_g . S_{n-1} for every token. h [H, K, V]."""
    return np.einsum("thk,hkv->thv", br["qg"], h) / np.sqrt(self.d)

  def write(self, br, h):
    """Delta rule, token by token in raster order (forget, error vs decayed state, add)."""
    h = h.copy()
    for t in range(br["kg"].shape[0]):
      for head in range(self.h):
        k, v = br["kg"][t, head], br["vg"][t, head]
        h[head] *= np.exp(br["g"][t, head])
        u = br["beta"][t, head] * (v - h[head].T @ k)
        h[head] += np.outer(k, u)
    return h

  def output(self, br, intra, inter):
    y = intra + br["gamma"][..., None] * inter
    return y.reshape(y.shape[0], -1) @ self.p["wo"] + self.p["bo"]


def oracle_forward(p, x_clean, x_noisy):
  """Per chunk n: (y_clean, y_noisy, S_n) from clean history; x_* [CHUNKS * L, dim], float64."""
  o = Oracle(p)
  l = F * GRID_H * GRID_W
  h = np.zeros((o.h, o.d, o.d))
  out = []
  for n in range(CHUNKS):
    pos = oracle_positions(n * F, F)
    sl = slice(n * l, (n + 1) * l)
    c, z = o.project(x_clean[sl], pos), o.project(x_noisy[sl], pos)
    yc = o.output(c, o.intra(c), o.read(c, h))
    yn = o.output(z, o.intra(z), o.read(z, h))  # noisy gamma from noisy x, same S_{n-1}
    h = o.write(c, h)  # g, beta and k_g, v_g of the clean tokens only
    out.append((yc, yn, h))
  return out


# ----------------------------------------------------------------------------------------------
# The layer under test, with randomised parameters.


def make_layer(seed=0):
  """A HybridAttention with every parameter random; gates far from trivial (see comments)."""
  layer = HybridAttention(DIM, HEADS, EPS, rngs=nnx.Rngs(seed), gdn_chunk_size=GDN_CHUNK)
  rng = np.random.default_rng(seed)
  d = DIM // HEADS
  normal = lambda *s, std=1.0: (std * rng.standard_normal(s)).astype(np.float32)
  for lin in (layer.q, layer.k, layer.v, layer.o):
    lin.kernel[...] = normal(DIM, DIM, std=DIM ** -0.5)
    lin.bias[...] = normal(DIM, std=0.3)
  for norm in (layer.norm_q, layer.norm_k):
    norm.scale[...] = (1.0 + normal(DIM, std=0.3))
  for phi in (layer.phi_q, layer.phi_k, layer.phi_v):  # far from identity and not orthogonal
    phi[...] = np.eye(d, dtype=np.float32) + normal(HEADS, d, d, std=0.6 * d ** -0.5)
  # x W ~ N(0, 1) per gate; A_log in [-3.5, -1.5] and dt_bias in [-1, 1], both far from 0, give
  # g in about [-0.5, -0.005]: the state neither vanishes within a chunk nor stays fixed.
  for lin in (layer.w_a, layer.w_b, layer.w_gate):
    lin.kernel[...] = normal(DIM, HEADS, std=DIM ** -0.5)
  layer.a_log[...] = rng.uniform(-3.5, -1.5, HEADS).astype(np.float32)
  layer.dt_bias[...] = rng.uniform(-1.0, 1.0, HEADS).astype(np.float32)
  return layer


def layer_params(layer):
  f64 = lambda a: np.asarray(a[...], np.float64)
  return {
      "wq": f64(layer.q.kernel), "bq": f64(layer.q.bias), "sq": f64(layer.norm_q.scale),
      "wk": f64(layer.k.kernel), "bk": f64(layer.k.bias), "sk": f64(layer.norm_k.scale),
      "wv": f64(layer.v.kernel), "bv": f64(layer.v.bias),
      "wo": f64(layer.o.kernel), "bo": f64(layer.o.bias),
      "phi_q": f64(layer.phi_q), "phi_k": f64(layer.phi_k), "phi_v": f64(layer.phi_v),
      "wa": f64(layer.w_a.kernel), "wb": f64(layer.w_b.kernel), "wgate": f64(layer.w_gate.kernel),
      "a_log": f64(layer.a_log), "dt_bias": f64(layer.dt_bias),
  }


def make_inputs(seed=1):
  rng = np.random.default_rng(seed)
  shape = (B, CHUNKS * F * GRID_H * GRID_W, DIM)
  return (rng.standard_normal(shape).astype(np.float32),
          rng.standard_normal(shape).astype(np.float32))


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def check(actual, expected, what):
  err = rel_err(actual, expected)
  assert err <= TOL, f"{what}: max relative error {err:.3g} > {TOL:.0e}"


@pytest.fixture(scope="module")
def setup():
  layer = make_layer()
  x_clean, x_noisy = make_inputs()
  p = layer_params(layer)
  expected = [oracle_forward(p, x_clean[b].astype(np.float64), x_noisy[b].astype(np.float64))
              for b in range(B)]
  # [chunk] -> (y_clean [B, L, dim], y_noisy [B, L, dim], S_n [B, H, K, V])
  expected = [tuple(np.stack([expected[b][n][i] for b in range(B)]) for i in range(3))
              for n in range(CHUNKS)]
  return layer, x_clean, x_noisy, expected


def test_oracle_setup_is_not_trivial(setup):
  """Memory and gates are live: otherwise the comparisons below could not see a wrong gate."""
  layer, x_clean, _, expected = setup
  p = layer_params(layer)
  br = Oracle(p).project(x_clean[0].astype(np.float64), oracle_positions(0, CHUNKS * F))
  assert -0.6 < br["g"].min() and br["g"].max() < -1e-3
  assert br["beta"].min() < 0.6 and br["beta"].max() > 1.4
  assert br["gamma"].min() < 0.3 and br["gamma"].max() > 0.7
  # The memory read moves the output of later chunks by a visible fraction.
  o = Oracle(p)
  l = F * GRID_H * GRID_W
  c = o.project(x_clean[0, l:2 * l].astype(np.float64), oracle_positions(F, F))
  inter = o.output(c, np.zeros_like(c["v"]), o.read(c, expected[0][2][0])) - p["bo"]
  assert np.abs(inter).max() > 0.1 * np.abs(expected[1][0][0]).max()


def test_teacher_forcing_matches_oracle(setup):
  layer, x_clean, x_noisy, expected = setup
  angles = rope_angles(0, CHUNKS * F, GRID_H, GRID_W, DIM // HEADS)
  yc, yn = layer.teacher_forcing(x_clean, x_noisy, angles, CHUNKS)
  l = F * GRID_H * GRID_W
  for n in range(CHUNKS):
    sl = slice(n * l, (n + 1) * l)
    check(yc[:, sl], expected[n][0], f"teacher forcing clean chunk {n}")
    check(yn[:, sl], expected[n][1], f"teacher forcing noisy chunk {n}")


def test_streaming_matches_oracle(setup):
  layer, x_clean, x_noisy, expected = setup
  l = F * GRID_H * GRID_W
  state = np.zeros((B, HEADS, DIM // HEADS, DIM // HEADS), np.float32)
  for n in range(CHUNKS):
    sl = slice(n * l, (n + 1) * l)
    angles = rope_angles(n * F, F, GRID_H, GRID_W, DIM // HEADS)  # as model.step offsets them
    y_noisy, unchanged = layer.step(x_noisy[:, sl], angles, state, write=False)
    assert unchanged is state  # denoising passes only read
    y_clean, state = layer.step(x_clean[:, sl], angles, state, write=True)
    check(y_noisy, expected[n][1], f"streaming denoising pass chunk {n}")
    check(y_clean, expected[n][0], f"streaming context pass chunk {n}")
    check(state, expected[n][2], f"state S_{n}")
