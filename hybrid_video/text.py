"""Prompt text -> umT5 embeddings, the way Wan and Causal-Forcing prepare them, with a disk cache.

  prompts (B strings) -> clean -> ids, mask [B, L] int32 (EOS appended, pad id 0, L = 512)
                      -> UMT5Encoder -> [B, L, dim] float32, rows past each real length ZERO

Wan keeps those zero rows: the DiT's cross-attention has no mask over the L text tokens, so
they (projected to text_embedding(0)) change the output. Cleaning is Wan's `whitespace` mode:
ftfy.fix_text, html.unescape twice, strip, collapse whitespace.

`PromptCache` stores each prompt's real rows [n, dim] as `<sha256>.npy` beside a run, keyed by
(cleaned prompt, encoder identity, max length), and runs the encoder only for misses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import os
import re
import tempfile
from typing import Sequence

import ftfy
import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece
import tokenizers
from absl import logging
from flax import nnx

from hybrid_video.nn.umt5 import UMT5Config, UMT5Encoder
from hybrid_video.weights.io import WeightsError
from hybrid_video.weights.umt5 import load_umt5

MAX_LENGTH = 512  # Wan's text length
# Where a weights folder keeps its tokenizer (Wan: google/umt5-xxl/; diffusers: tokenizer/).
_TOKENIZER_SUBDIRS = ("", "tokenizer", os.path.join("google", "umt5-xxl"))


def clean_prompt(text: str) -> str:
  """Wan's prompt cleaning: fix mojibake (ftfy), unescape html twice, collapse whitespace."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return re.sub(r"\s+", " ", text).strip()


class Tokenizer:
  """umT5 tokenization: `tokenizer.json` through `tokenizers`, else `spiece.model`.

  Both give ids with EOS appended; a prompt longer than `max_length` keeps its first
  max_length - 1 tokens and the EOS, as transformers' T5 tokenizer does with truncation.
  """

  def __init__(self, path: str):
    self.path = self._find(path)
    try:
      if self.path.endswith(".json"):
        self._tok, self._sp = tokenizers.Tokenizer.from_file(self.path), None
        self._tok.no_padding()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.pad_id = self._tok.token_to_id("<pad>")
        self.pad_id = 0 if self.pad_id is None else self.pad_id
      else:
        self._tok, self._sp = None, sentencepiece.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = self._sp.get_piece_size()
        self.pad_id = max(self._sp.pad_id(), 0)
        self.eos_id = self._sp.eos_id()
    except Exception as e:  # tokenizers raises a bare Exception on a bad json, sp a RuntimeError
      raise WeightsError(f"{self.path} is not a readable tokenizer "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
                         ) from None
    if self._sp is not None and self.eos_id < 0:
      raise WeightsError(f"{self.path} defines no EOS token; it is not a T5 sentencepiece model")

  @staticmethod
  def _find(path: str) -> str:
    if os.path.isfile(path):
      return path
    if not os.path.isdir(path):
      raise WeightsError(f"tokenizer path {path} does not exist")
    for name in ("tokenizer.json", "spiece.model"):  # tokenizer.json preferred
      for sub in _TOKENIZER_SUBDIRS:
        candidate = os.path.join(path, sub, name)
        if os.path.isfile(candidate):
          return candidate
    raise WeightsError(f"no tokenizer.json or spiece.model in {path} (or its "
                       f"{', '.join(s for s in _TOKENIZER_SUBDIRS if s)} folders)")

  def __call__(self, prompts: Sequence[str], max_length: int = MAX_LENGTH
               ) -> tuple[np.ndarray, np.ndarray]:
    """Cleaned prompts -> ids, mask [B, max_length] int32 (mask 1 on real tokens and EOS)."""
    if max_length < 1:
      raise ValueError(f"{max_length=} must be >= 1")
    if self._sp is not None:
      rows = [self._sp.encode(p)[:max_length - 1] + [self.eos_id] for p in prompts]
    else:
      self._tok.enable_truncation(max_length)  # counts the EOS the post-processor adds
      rows = [e.ids for e in self._tok.encode_batch(list(prompts), add_special_tokens=True)]
    ids = np.full((len(rows), max_length), self.pad_id, np.int32)
    mask = np.zeros((len(rows), max_length), np.int32)
    for b, row in enumerate(rows):
      ids[b, :len(row)] = row
      mask[b, :len(row)] = 1
    return ids, mask


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
  """The tokenizer's ids must index the encoder's embedding table."""
  if tokenizer.vocab_size > vocab_size:
    raise WeightsError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids but the "
                       f"encoder's vocabulary has {vocab_size}: the tokenizer does not match "
                       "the encoder weights")


class TextEncoder:
  """Tokenizer + umT5 encoder: `encode(prompts) -> [B, max_length, dim]` float32 (numpy)."""

  def __init__(self, tokenizer: Tokenizer, encoder: UMT5Encoder, *, identity: str,
               max_length: int = MAX_LENGTH):
    """`identity` names the weights (path, config, dtype) for cache keys."""
    check_vocab(tokenizer, encoder.config.vocab_size)
    self.tokenizer, self.max_length = tokenizer, max_length
    self.identity = f"{identity}|tokenizer={tokenizer.path}"
    self.dim = encoder.config.dim
    graphdef, state = nnx.split(encoder)
    self._state = state

    @jax.jit
    def forward(state, ids, mask):
      out = nnx.merge(graphdef, state)(ids, mask)
      return out * mask[..., None].astype(out.dtype)  # Wan: u[:len], then zero padding
    self._forward = forward

  @classmethod
  def from_pretrained(cls, weights: str, tokenizer: str, config: UMT5Config | None = None, *,
                      dtype=None, max_length: int = MAX_LENGTH, mesh=None,
                      rules=None) -> "TextEncoder":
    """Load the encoder from `weights` (see weights/umt5.py) and the tokenizer from `tokenizer`.

    The tokenizer is checked against the config before the (large) weights are read.
    """
    config = config or UMT5Config()
    tok = Tokenizer(tokenizer)
    check_vocab(tok, config.vocab_size)
    encoder = load_umt5(weights, config, dtype, mesh=mesh, rules=rules)
    identity = f"{os.path.abspath(weights)}|{encoder.config}"
    return cls(tok, encoder, identity=identity, max_length=max_length)

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Raw prompts -> cleaned -> ids, mask [B, max_length] int32."""
    return self.tokenizer([clean_prompt(p) for p in prompts], self.max_length)

  def encode_cleaned(self, cleaned: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Cleaned prompts -> ([B, max_length, dim] float32 zero-padded, real lengths [B])."""
    ids, mask = self.tokenizer(cleaned, self.max_length)
    out = self._forward(self._state, jnp.asarray(ids), jnp.asarray(mask))
    return np.asarray(out, np.float32), mask.sum(axis=1)

  def encode(self, prompts: Sequence[str]) -> np.ndarray:
    """Raw prompts -> [B, max_length, dim] float32, zero past each prompt's real length."""
    return self.encode_cleaned([clean_prompt(p) for p in prompts])[0]


def _write_atomic(path: str, write) -> None:
  """`write(file)` into a temporary file beside `path`, then rename it over `path`."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


@dataclasses.dataclass
class CacheStats:
  hits: int = 0
  misses: int = 0


class PromptCache:
  """Prompt embeddings on disk: `<key>.npy` holds a prompt's real rows [n, dim] float32.

  key = sha256 of (cleaned prompt, encoder identity, max length); `index.json` lists the
  entries for people (the .npy files are the truth). Entries are written to a temporary file
  and renamed, so a crash never leaves a partial entry; an unreadable entry counts as a miss.
  """

  def __init__(self, directory: str, encoder: TextEncoder):
    self.directory, self.encoder = directory, encoder
    self.stats = CacheStats()  # cumulative
    os.makedirs(directory, exist_ok=True)

  def key(self, cleaned: str) -> str:
    blob = json.dumps([cleaned, self.encoder.identity, self.encoder.max_length])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()

  def _load(self, key: str) -> np.ndarray | None:
    path = os.path.join(self.directory, key + ".npy")
    if not os.path.isfile(path):
      return None
    try:
      rows = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      logging.warning("prompt cache entry %s is unreadable (%s); encoding again", path, e)
      return None
    if rows.ndim != 2 or rows.shape[1] != self.encoder.dim or not (
        1 <= rows.shape[0] <= self.encoder.max_length):
      logging.warning("prompt cache entry %s has shape %s; encoding again", path, rows.shape)
      return None
    return rows

  def _store(self, key: str, cleaned: str, rows: np.ndarray) -> None:
    _write_atomic(os.path.join(self.directory, key + ".npy"), lambda f: np.save(f, rows))
    index_path = os.path.join(self.directory, "index.json")
    try:
      with open(index_path) as f:
        index = json.load(f)
    except (OSError, ValueError):
      index = {}
    index[key] = {"prompt": cleaned, "tokens": int(rows.shape[0]),
                  "encoder": self.encoder.identity, "max_length": self.encoder.max_length}
    _write_atomic(index_path, lambda f: f.write(json.dumps(index, indent=1).encode("utf-8")))

  def get_or_encode(self, prompts: Sequence[str]) -> np.ndarray:
    """Raw prompts -> [B, max_length, dim] float32 (as `TextEncoder.encode`), misses encoded once.

    Updates `self.stats` (hits and misses count prompts; a repeated miss in one call is
    encoded once and counted once).
    """
    cleaned = [clean_prompt(p) for p in prompts]
    keys = [self.key(c) for c in cleaned]
    found = {k: r for k in dict.fromkeys(keys) if (r := self._load(k)) is not None}
    todo = [k for k in dict.fromkeys(keys) if k not in found]
    self.stats.hits += sum(k in found for k in keys)
    self.stats.misses += len(todo)
    if todo:
      texts = [cleaned[keys.index(k)] for k in todo]
      out, lengths = self.encoder.encode_cleaned(texts)
      for k, text, emb, n in zip(todo, texts, out, lengths):
        found[k] = emb[:int(n)]
        self._store(k, text, found[k])
    out = np.zeros((len(prompts), self.encoder.max_length, self.encoder.dim), np.float32)
    for b, k in enumerate(keys):
      out[b, :found[k].shape[0]] = found[k]
    return out
