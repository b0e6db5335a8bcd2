"""Text to long video: prompt embeddings -> the streaming DiT in latent space -> the streaming VAE
-> RGB frames, chunk by chunk at constant memory (wan-stack doc §3-§5).

  schedule = parse_prompt_schedule('0:"a cat walks" 120:"the cat sits down"')
  t2v = TextToVideo(model, config.sampler, vae, embed_prompts, latent_hw=(60, 104))
  stats = t2v.stream(schedule, num_frames=961, seed=0, on_frames=writer.write)

Per latent chunk n (F latent frames): the sampler denoises it (the configured schedule; Causal-
Forcing's is few_step [1000, 750, 500, 250] at shift 5), writes it with the context pass at
t = 0, and the VAE decodes it with its feature cache: 1 + 4(F - 1) video frames for the first
chunk, 4F for each later one.

Prompt switching: a schedule entry (frame, prompt) takes effect at the first chunk whose first
video frame is >= frame. At a switch only the conditioning changes: the cross-attention keys and
values are computed from the new prompt's embeddings (they are recomputed every pass from the
context; nothing of the old prompt is cached), while the softmax layers' K/V caches, the hybrid
layers' memory states and the VAE's feature cache carry on, so the video stays continuous.
Chunks before the switch are computed exactly as in a run without it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from hybrid_video.errors import UserError
from hybrid_video.nn.model import CausalDiT, carry_bytes
from hybrid_video.nn.vae import StreamingVAE
from hybrid_video.streaming import StreamingSampler

_ENTRY = re.compile(r'\s*(\d+)\s*:\s*"((?:[^"\\]|\\.)*)"\s*')


def parse_prompt_schedule(text: str) -> list[tuple[int, str]]:
  """'a cat walks' -> [(0, 'a cat walks')]; '0:"a cat walks" 120:"the cat sits down"' ->
  [(0, ...), (120, ...)]. Frames are video frames, strictly increasing from 0."""
  text = (text or "").strip()
  if not text:
    raise UserError("the prompt is empty")
  if not _ENTRY.match(text):
    return [(0, text)]
  entries, pos = [], 0
  while pos < len(text):
    m = _ENTRY.match(text, pos)
    if not m:
      raise UserError(f"prompt schedule {text!r}: expected FRAME:\"PROMPT\" at {text[pos:]!r}")
    entries.append((int(m.group(1)), m.group(2).replace('\\"', '"')))
    pos = m.end()
  frames = [f for f, _ in entries]
  if frames[0] != 0 or any(b <= a for a, b in zip(frames, frames[1:])):
    raise UserError(f"prompt schedule frames {frames} must start at 0 and increase")
  if any(not p.strip() for _, p in entries):
    raise UserError(f"prompt schedule {text!r} has an empty prompt")
  return entries


def read_prompt_file(path: str) -> list[str]:
  """One prompt (or schedule) per non-empty line; '#' starts a comment line."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = [l.strip() for l in f]
  except OSError as e:
    raise UserError(f"cannot read the prompt file {path}: {e.strerror}") from None
  prompts = [l for l in lines if l and not l.startswith("#")]
  if not prompts:
    raise UserError(f"the prompt file {path} has no prompt")
  return prompts


def chunk_video_frames(chunk: int, latent_frames: int, time_factor: int = 4) -> int:
  """Video frames the VAE gives for latent chunk `chunk` of `latent_frames` latents."""
  return (1 + time_factor * (latent_frames - 1)) if chunk == 0 else time_factor * latent_frames


def chunk_start_frame(chunk: int, latent_frames: int, time_factor: int = 4) -> int:
  """The first video frame of latent chunk `chunk`."""
  if chunk == 0:
    return 0
  return chunk_video_frames(0, latent_frames, time_factor) + time_factor * latent_frames * (
      chunk - 1)


def num_chunks_for(num_frames: int, latent_frames: int, time_factor: int = 4) -> int:
  """Latent chunks needed for `num_frames` video frames."""
  first = chunk_video_frames(0, latent_frames, time_factor)
  if num_frames <= first:
    return 1
  return 1 + math.ceil((num_frames - first) / (time_factor * latent_frames))


@dataclasses.dataclass
class T2VStats:
  num_frames: int = 0
  num_chunks: int = 0
  prompts_at_chunk: dict = dataclasses.field(default_factory=dict)  # chunk -> prompt index
  chunk_seconds: list = dataclasses.field(default_factory=list)
  carry_bytes: list = dataclasses.field(default_factory=list)
  vae_cache_bytes: int = 0
  wall_seconds: float = 0.0
  sampler_compiles: int = 0


class TextToVideo:
  """The streaming DiT + streaming VAE for one model, sampler config and latent frame size.

  embed_prompts: list of prompts -> [len, tokens, text_dim] float embeddings (e.g.
  `PromptCache.get_or_encode`, or `TextEncoder.encode`). Batch 1: one video per stream.
  """

  def __init__(self, model: CausalDiT, sampler_cfg, vae: StreamingVAE,
               embed_prompts: Callable[[Sequence[str]], np.ndarray], *, latent_hw,
               mesh=None, rules=None):
    if model.in_channels != vae.config.z_dim:
      raise UserError(f"the DiT generates {model.in_channels} latent channels but the VAE's "
                       f"z_dim is {vae.config.z_dim}")
    self.model, self.vae, self.embed_prompts = model, vae, embed_prompts
    if mesh is not None:  # the VAE decodes the sampler's latents where they are: on the mesh
      vae.replicate(mesh)
    self.latent_hw = tuple(int(s) for s in latent_hw)
    self.sampler = StreamingSampler(model, sampler_cfg, batch=1, frame_hw=self.latent_hw,
                                    mesh=mesh, rules=rules)
    self.time_factor = vae.config.time_factor
    self.latent_frames = model.frames_per_chunk

  def stream(self, schedule: list[tuple[int, str]], num_frames: int, *, seed: int = 0,
             on_frames: Callable[[np.ndarray], None] | None = None,
             progress: bool = True) -> T2VStats:
    """Generate `num_frames` video frames; on_frames gets uint8-ready float frames
    [T', H, W, 3] in [-1, 1] per chunk, as they are decoded."""
    if num_frames <= 0:
      raise UserError(f"num_frames={num_frames} must be positive")
    f, tf = self.latent_frames, self.time_factor
    num_chunks = num_chunks_for(num_frames, f, tf)
    embeddings = np.asarray(self.embed_prompts([p for _, p in schedule]), np.float32)
    key, first = self.sampler.prepare(seed, jnp.asarray(embeddings[:1]))
    contexts = [first] + [self.sampler.embed(jnp.asarray(e[None])) for e in embeddings[1:]]
    carry = self.sampler.init_carry()
    cache = self.vae.init_decode_cache(1, *self.latent_hw)
    stats = T2VStats(num_frames=num_frames, num_chunks=num_chunks)
    start, written = time.perf_counter(), 0
    bar = tqdm(total=num_frames, unit="frame", desc="text-to-video", disable=not progress)
    for n in range(num_chunks):
      first = chunk_start_frame(n, f, tf)
      prompt = max(i for i, (frame, _) in enumerate(schedule) if frame <= first)
      stats.prompts_at_chunk[n] = prompt
      t0 = time.perf_counter()
      carry = self.sampler.reserve(carry, n)
      carry, latents = self.sampler.generate(carry, key, contexts[prompt])
      frames, cache = self.vae.decode_chunk(cache, latents)
      frames = np.asarray(frames[0])[:num_frames - written]  # blocks until decoded
      stats.chunk_seconds.append(time.perf_counter() - t0)
      stats.carry_bytes.append(carry_bytes(carry))
      written += frames.shape[0]
      if on_frames is not None:
        on_frames(frames)
      bar.update(frames.shape[0])
      bar.set_postfix(fps=f"{written / max(time.perf_counter() - start, 1e-9):.2f}",
                      chunk=n)
    bar.close()
    stats.vae_cache_bytes = sum(int(a.size) * a.dtype.itemsize for a in cache.convs)
    stats.wall_seconds = time.perf_counter() - start
    stats.sampler_compiles = self.sampler.compiles
    return stats
