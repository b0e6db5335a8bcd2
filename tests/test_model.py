"""Model invariants: streaming equals teacher forcing, causality, the hybrid read/write rules."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_video.checkpoint import config_differences
from hybrid_video.errors import UserError
from hybrid_video.nn.embeddings import rope_angles, rope_bands
from hybrid_video.nn.hybrid_attention import HybridAttention
from hybrid_video.nn.model import X0_MIN_T, CausalDiT, resolve_hybrid_layers
from kernels.gated_delta.reference import naive_recurrent_gated_delta_rule
from kernels.local_attention.reference import attention_reference
from tests.helpers import jit_call, perturbed, rel_err, tiny_model, tiny_model_config

B, CHUNKS, F, HW = 2, 4, 2, 16
TOL = 1e-5


def _inputs(seed=0, chunks=CHUNKS, frames_per_chunk=F):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  shape = (B, chunks * frames_per_chunk, HW, HW, 1)
  clean = jax.random.uniform(k1, shape, minval=-1, maxval=1)
  noise = jax.random.normal(k2, shape)
  t = jax.random.uniform(k3, (B, chunks), minval=0.05, maxval=0.95)
  t_frames = jnp.repeat(t, frames_per_chunk, axis=1)[..., None, None, None]
  noisy = (1 - t_frames) * clean + t_frames * noise
  labels = jnp.array([[3], [7]])
  return clean, noisy, t, labels


def _stream_outputs(model, clean, noisy, t, labels, jit=True):
  """The sampler's model output for every chunk, given the clean history (context passes)."""
  graphdef, state = nnx.split(model)
  f = model.frames_per_chunk

  def step(state, carry, x, t, context, write):
    return nnx.merge(graphdef, state).step(x, t, context, carry, write=write)

  step = jax.jit(step, static_argnames="write") if jit else step
  context = model.embed_condition(labels, B)
  carry = model.init_carry(B, (HW, HW), capacity_chunks=clean.shape[1] // f)
  outs = []
  for n in range(clean.shape[1] // f):
    sl = slice(n * f, (n + 1) * f)
    out, carry = step(state, carry, noisy[:, sl], t[:, n], context, False)
    outs.append(out)
    _, carry = step(state, carry, clean[:, sl], jnp.zeros((B,)), context, True)
  return jnp.concatenate(outs, axis=1), carry


@pytest.mark.parametrize("ratio", [0.0, 1.0, 0.5], ids=["softmax", "hybrid100", "mixed"])
def test_streaming_equals_teacher_forcing(ratio):
  model = tiny_model(ratio)
  clean, noisy, t, labels = _inputs()
  tf = jit_call(model, "teacher_forcing", clean, noisy, t, labels)
  stream, _ = _stream_outputs(model, clean, noisy, t, labels)
  for n in range(CHUNKS):
    sl = slice(n * F, (n + 1) * F)
    assert rel_err(stream[:, sl], tf[:, sl]) <= TOL, f"chunk {n}"
  assert float(jnp.max(jnp.abs(tf))) > 1e-2  # the comparison is not between zeros


def test_streaming_equals_teacher_forcing_with_a_blocked_cache_sweep(monkeypatch):
  """The XLA cached attention sweeps caches longer than CACHE_KEY_BLOCK keys in blocks (online
  softmax); with a small block every chunk n >= 1 of the softmax layers takes that path."""
  from kernels.local_attention import xla as attention_xla
  monkeypatch.setattr(attention_xla, "CACHE_KEY_BLOCK", 48)  # not a divisor of the cache
  model = tiny_model(0.5)
  clean, noisy, t, labels = _inputs()
  tf = jit_call(model, "teacher_forcing", clean, noisy, t, labels)
  stream, _ = _stream_outputs(model, clean, noisy, t, labels)
  tokens_per_chunk = int(np.prod(model.chunk_grid((HW, HW))))
  # The cache holds CHUNKS * 32 = 128 keys: three blocks of 48, the last shifted back.
  assert tokens_per_chunk * CHUNKS > 48 and (tokens_per_chunk * CHUNKS) % 48
  assert rel_err(stream, tf) <= TOL


def test_streaming_equals_teacher_forcing_single_frame_chunks_unconditional():
  model = CausalDiT(tiny_model_config(0.5, frames_per_chunk=1, cond="none"), rngs=nnx.Rngs(3))
  from tests.helpers import open_memory_gates, perturbed
  model = open_memory_gates(perturbed(model, seed=4))
  clean, noisy, t, _ = _inputs(seed=1, chunks=5, frames_per_chunk=1)
  tf = jit_call(model, "teacher_forcing", clean, noisy, t, None)
  stream, _ = _stream_outputs(model, clean, noisy, t, None)
  assert rel_err(stream, tf) <= TOL


def test_memory_branch_matters(monkeypatch):
  """With the memory read removed, later chunks change: the test above is not vacuous."""
  model = tiny_model(1.0)
  clean, noisy, t, labels = _inputs()
  full = jit_call(model, "teacher_forcing", clean, noisy, t, labels)
  # gamma = 0 for every token and head: the output is the intra branch alone. (A large negative
  # w_gate kernel would not do: sigmoid(x W_gate) -> 1 wherever x sums negative.)
  monkeypatch.setattr(HybridAttention, "output_gate",
                      lambda self, x: jnp.zeros((*x.shape[:-1], self.num_heads), jnp.float32))
  no_memory = jit_call(model, "teacher_forcing", clean, noisy, t, labels)
  assert rel_err(no_memory[:, :F], full[:, :F]) <= TOL  # chunk 0 has no memory term
  assert rel_err(no_memory[:, F:], full[:, F:]) > 1e-3


@pytest.mark.parametrize("ratio", [0.0, 0.75, 1.0])
def test_causality(ratio):
  model = tiny_model(ratio)
  clean, noisy, t, labels = _inputs()
  out = jit_call(model, "teacher_forcing", clean, noisy, t, labels)
  n = 1  # change chunk n+1 (clean and noisy) and everything after it
  changed_from = (n + 1) * F
  clean2 = clean.at[:, changed_from:].set(-clean[:, changed_from:])
  noisy2 = noisy.at[:, changed_from:].add(1.0)
  t2 = t.at[:, n + 1:].set(0.5)
  out2 = jit_call(model, "teacher_forcing", clean2, noisy2, t2, labels)
  np.testing.assert_array_equal(np.asarray(out[:, :changed_from]),
                                np.asarray(out2[:, :changed_from]))
  assert rel_err(out2[:, changed_from:], out[:, changed_from:]) > 1e-3


def test_hybrid_layer_reads_exactly_previous_state():
  """Each token of chunk n reads S_{n-1}; the context pass writes the reference scan's state."""
  model = tiny_model(1.0)
  attn = model.blocks[0].self_attn
  d = attn.head_dim
  l, n_chunks = 32, 3
  kx, kn = jax.random.split(jax.random.key(7))
  x_clean = jax.random.normal(kx, (B, n_chunks * l, model.dim))
  x_noisy = jax.random.normal(kn, (B, n_chunks * l, model.dim))
  angles = rope_angles(0, n_chunks * F, 4, 4, d)
  yc, yn = jit_call(attn, "teacher_forcing", x_clean, x_noisy, angles, num_chunks=n_chunks)

  # Independent reference: explicit states from the naive token scan over clean chunks only.
  c, z = attn.branches(x_clean, angles), attn.branches(x_noisy, angles)
  g, beta = attn.write_gates(x_clean)
  state = jnp.zeros((B, attn.num_heads, d, d))
  for n in range(n_chunks):
    sl = slice(n * l, (n + 1) * l)
    for x, br, y in ((x_clean, c, yc), (x_noisy, z, yn)):
      intra = attention_reference(br["q"][:, sl], br["k"][:, sl], br["v"][:, sl])
      inter = jnp.einsum("bthk,bhkv->bthv", br["qg"][:, sl] * d ** -0.5, state,
                         precision="highest")
      assert rel_err(attn.fuse(x[:, sl], intra, inter), y[:, sl]) <= TOL, f"chunk {n}"
    # The streaming context pass on the clean chunk writes S_n = scan(S_{n-1}, clean chunk).
    _, written = attn.step(x_clean[:, sl], angles[sl], state, write=True)
    _, expected = naive_recurrent_gated_delta_rule(
        c["qg"][:, sl], c["kg"][:, sl], c["vg"][:, sl], g[:, sl], beta[:, sl],
        initial_state=state)
    assert rel_err(written, expected) <= TOL
    # A denoising pass (write=False) leaves the state alone.
    _, same = attn.step(x_noisy[:, sl], angles[sl], state, write=False)
    assert same is state
    state = expected
  assert float(jnp.max(jnp.abs(state))) > 1e-2


def test_gate_ranges_and_init():
  model = CausalDiT(tiny_model_config(1.0), rngs=nnx.Rngs(0))
  attn = model.blocks[0].self_attn
  eye = np.eye(attn.head_dim)
  for phi in (attn.phi_q, attn.phi_k, attn.phi_v):
    np.testing.assert_array_equal(np.asarray(phi[...]), np.broadcast_to(eye, phi.shape))
  a = np.exp(np.asarray(attn.a_log[...]))
  assert np.all((a > 0) & (a <= 16))
  dt = np.log1p(np.exp(np.asarray(attn.dt_bias[...])))  # softplus(dt_bias) = dt
  assert np.all((dt >= 1e-4 - 1e-7) & (dt <= 0.1 + 1e-6))
  x = 100.0 * jax.random.normal(jax.random.key(0), (1, 64, model.dim))
  g, beta = attn.write_gates(x)
  assert float(g.max()) <= 0.0
  assert float(beta.min()) >= 0.0 and float(beta.max()) <= 2.0


def test_rope_band_split():
  assert rope_bands(128) == (44, 42, 42)
  assert rope_bands(24) == (8, 8, 8)
  a = rope_angles(3, 2, 2, 2, 24)
  assert a.shape == (8, 12)
  # time band depends only on the frame, the height band only on the row.
  np.testing.assert_allclose(a[0, :4], 3 * a[4, :4] / 4)
  np.testing.assert_array_equal(a[0, 4:8], a[1, 4:8])


def test_hybrid_layer_selection():
  assert resolve_hybrid_layers(8, None, 0.75) == (0, 1, 2, 3, 4, 5)
  assert resolve_hybrid_layers(8, None, 0.0) == ()
  assert resolve_hybrid_layers(8, None, 1.0) == tuple(range(8))
  assert resolve_hybrid_layers(8, [5, 1], 0.75) == (1, 5)
  with pytest.raises(ValueError, match=r"out of range.*num_layers=8"):
    resolve_hybrid_layers(8, [0, 8])
  with pytest.raises(ValueError, match="ratio"):
    resolve_hybrid_layers(8, None, 1.5)


def test_bad_inputs_give_clear_errors():
  with pytest.raises(ValueError, match="out of range"):
    CausalDiT(tiny_model_config(layers=[0, 4]), rngs=nnx.Rngs(0))
  model = CausalDiT(tiny_model_config(0.5), rngs=nnx.Rngs(0))
  x = jnp.zeros((1, 4, 18, 16, 1))
  with pytest.raises(ValueError, match="not divisible by the patch size"):
    model.teacher_forcing(x, x, jnp.zeros((1, 2)), jnp.zeros((1, 1), jnp.int32))
  x = jnp.zeros((1, 5, 16, 16, 1))
  with pytest.raises(ValueError, match="does not divide the clip"):
    model.teacher_forcing(x, x, jnp.zeros((1, 2)), jnp.zeros((1, 1), jnp.int32))
  with pytest.raises(ValueError, match="not divisible by the patch size"):
    model.init_carry(1, (16, 15))


def _with_memory(model_ratio, **memory):
  model = tiny_model(model_ratio)
  for block in model.blocks:
    if block.hybrid:
      block.self_attn.read_mode = memory.get("read", "block")
      block.self_attn.write_during_denoising = memory.get("write_during_denoising", False)
  return model


def test_token_read_ablation_streaming_equals_teacher_forcing_and_changes_output():
  clean, noisy, t, labels = _inputs()
  block_out = jit_call(tiny_model(0.75), "teacher_forcing", clean, noisy, t, labels)
  model = _with_memory(0.75, read="token")
  tf = jit_call(model, "teacher_forcing", clean, noisy, t, labels)
  stream, _ = _stream_outputs(model, clean, noisy, t, labels)
  assert rel_err(stream, tf) <= TOL
  # Token read sees the chunk's own earlier tokens even in chunk 0: every chunk changes.
  for n in range(CHUNKS):
    sl = slice(n * F, (n + 1) * F)
    assert rel_err(tf[:, sl], block_out[:, sl]) > 1e-4, f"chunk {n}"


def test_write_during_denoising_ablation_changes_streaming_only_after_chunk_0():
  clean, noisy, t, labels = _inputs()
  default, _ = _stream_outputs(tiny_model(0.75), clean, noisy, t, labels)
  ablation, _ = _stream_outputs(_with_memory(0.75, write_during_denoising=True), clean, noisy, t,
                                labels)
  # _stream_outputs makes one denoising pass per chunk; its write lands before chunk n's
  # context pass, so chunk 0's output is unchanged and later chunks differ.
  assert rel_err(ablation[:, :F], default[:, :F]) <= TOL
  assert rel_err(ablation[:, F:], default[:, F:]) > 1e-4
  with pytest.raises(ValueError, match="no teacher-forcing form"):
    jit_call(_with_memory(0.75, write_during_denoising=True), "teacher_forcing", clean, noisy, t,
             labels)


def test_x0_prediction_returns_the_velocity_of_its_x0_estimate():
  """model.prediction="x0": the head predicts x0_hat and the model returns the velocity
  (x_t - x0_hat) / max(t, X0_MIN_T), in teacher forcing and in streaming alike; a checkpoint saved
  before the field existed meant "velocity"."""
  cfg = tiny_model_config(0.5)
  velocity_model = perturbed(CausalDiT(cfg, rngs=nnx.Rngs(5)), seed=6)
  cfg.prediction = "x0"
  x0_model = perturbed(CausalDiT(cfg, rngs=nnx.Rngs(5)), seed=6)  # the same parameters
  clean, noisy, t, labels = _inputs(seed=2)
  t = t.at[0, 1].set(0.01)  # below X0_MIN_T: the division is clipped there
  head = jit_call(velocity_model, "teacher_forcing", clean, noisy, t, labels)  # raw head output
  velocity = jit_call(x0_model, "teacher_forcing", clean, noisy, t, labels)
  t_frames = jnp.repeat(jnp.maximum(t, X0_MIN_T), F, axis=1)[..., None, None, None]
  assert rel_err(velocity, (noisy - head) / t_frames) <= TOL
  stream, _ = _stream_outputs(x0_model, clean, noisy, t, labels)
  assert rel_err(stream, velocity) <= TOL
  saved = _model_json(tiny_model_config(0.5))
  del saved["model"]["prediction"]
  assert config_differences(saved, _model_json(tiny_model_config(0.5))) == []
  assert config_differences(saved, _model_json(cfg)) == ["model.prediction: 'velocity' -> 'x0'"]
  cfg.prediction = "eps"
  with pytest.raises(UserError, match="model.prediction='eps'"):
    CausalDiT(cfg, rngs=nnx.Rngs(0))


def _model_json(model_cfg) -> dict:
  return {"model": json.loads(model_cfg.to_json_best_effort())}


def test_label_adaln_conditions_every_block_and_streams_as_it_trains():
  """model.label_adaln: the label's embedding joins the timestep embedding (zero-initialised);
  once trained (perturbed), the same noisy input gives a different prediction for another label
  in every chunk, streaming equals teacher forcing, and old checkpoints mean False."""
  cfg = tiny_model_config(0.75)
  cfg.label_adaln = True
  model = CausalDiT(cfg, rngs=nnx.Rngs(3))
  np.testing.assert_array_equal(np.asarray(model.label_to_time.kernel[...]), 0.0)
  model = perturbed(model, seed=4)
  clean, noisy, t, labels = _inputs(seed=3)
  tf = jit_call(model, "teacher_forcing", clean, noisy, t, labels)
  stream, _ = _stream_outputs(model, clean, noisy, t, labels)
  assert rel_err(stream, tf) <= TOL
  # Without it (the same other parameters) the output differs in every chunk.
  plain = nnx.clone(model)
  plain.label_to_time.kernel[...] = jnp.zeros_like(plain.label_to_time.kernel[...])
  plain.label_to_time.bias[...] = jnp.zeros_like(plain.label_to_time.bias[...])
  tf_plain = jit_call(plain, "teacher_forcing", clean, noisy, t, labels)
  for n in range(CHUNKS):
    sl = slice(n * F, (n + 1) * F)
    assert rel_err(tf[:, sl], tf_plain[:, sl]) > 1e-4, f"chunk {n}"
  saved = _model_json(tiny_model_config(0.75))
  saved["model"].pop("label_adaln", None)
  assert config_differences(saved, _model_json(tiny_model_config(0.75))) == []
  assert config_differences(saved, _model_json(cfg)) == ["model.label_adaln: False -> True"]
  cfg.cond = "none"  # only label models get it
  assert CausalDiT(cfg, rngs=nnx.Rngs(0)).label_to_time is None


def test_label_tokens_give_each_label_several_keys_and_stream_as_they_train():
  """model.label_tokens = L: each label is L conditioning tokens (the null label too), so the
  cross-attention's softmax runs over L keys and its output differs from video token to video
  token; with L = 1 it is one key and the same vector for every token. Streaming equals teacher
  forcing, and old checkpoints (no field) mean 1."""
  from hybrid_video.nn.attention import CrossAttention  # pylint: disable=g-import-not-at-top
  cfg = tiny_model_config(0.75)
  cfg.null_label = True
  cfg.label_tokens = 4
  model = perturbed(CausalDiT(cfg, rngs=nnx.Rngs(5)), seed=6)
  clean, noisy, t, labels = _inputs(seed=5)
  context = model.embed_condition(labels, B)
  assert context.shape == (B, 4, cfg.dim)
  assert model.null_condition(B).shape == (B, 4, cfg.dim)
  assert float(jnp.min(jnp.std(context, axis=1))) > 0  # four different tokens per label
  # The first block's cross-attention: per-token outputs vary with 4 keys, not with 1.
  cross = model.blocks[0].cross_attn
  assert isinstance(cross, CrossAttention)
  x = jax.random.normal(jax.random.key(0), (B, 8, cfg.dim))
  spread = lambda y: float(jnp.max(jnp.std(y, axis=1)) / jnp.max(jnp.abs(y)))
  assert spread(cross(x, context)) > 1e-3
  assert spread(cross(x, context[:, :1])) < 1e-6
  tf = jit_call(model, "teacher_forcing", clean, noisy, t, labels)
  stream, _ = _stream_outputs(model, clean, noisy, t, labels)
  assert rel_err(stream, tf) <= TOL
  other = jit_call(model, "teacher_forcing", clean, noisy, t, 9 - labels)
  assert rel_err(other, tf) > 1e-4
  saved = _model_json(tiny_model_config(0.75))
  saved["model"].pop("label_tokens", None)
  assert config_differences(saved, _model_json(tiny_model_config(0.75))) == []
  cfg.label_tokens = 0
  with pytest.raises(UserError, match="label_tokens=0"):
    CausalDiT(cfg, rngs=nnx.Rngs(0))
