"""Wan's prompt handling (clean, tokenize, encode, zero the padding) and the prompt cache.

References: tests/fixtures/umt5 (transformers' T5 tokenizer and UMT5EncoderModel on the strings
of text.json, max length 24; scripts/fixtures/make_umt5.py).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx

from hybrid_video import text
from hybrid_video.nn.umt5 import UMT5Config, UMT5Encoder
from hybrid_video.weights.io import WeightsError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "umt5")
TOKENIZER_DIR = os.path.join(FIXTURES, "tokenizer")


@pytest.fixture(scope="module")
def strings():
  with open(os.path.join(FIXTURES, "text.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(os.path.join(FIXTURES, "reference.npz")))


@pytest.fixture(scope="module")
def encoder(strings):
  return text.TextEncoder.from_pretrained(
      os.path.join(FIXTURES, "wan_umt5.safetensors"), TOKENIZER_DIR, UMT5Config.tiny(),
      max_length=strings["max_length"])


def test_clean_prompt(strings):
  got = [text.clean_prompt(s) for s in strings["raw"]]
  assert got == strings["cleaned"]          # what Wan's cleaning gave in the fixture venv
  assert got == strings["expected_cleaned"]  # and what a person expects


@pytest.mark.parametrize("name", ["tokenizer.json", "spiece.model"])
def test_tokenizer_matches_transformers(strings, ref, tmp_path, name):
  shutil.copy(os.path.join(TOKENIZER_DIR, name), tmp_path / name)  # only that file present
  tok = text.Tokenizer(str(tmp_path))
  assert tok.path.endswith(name)
  ids, mask = tok(strings["cleaned"], strings["max_length"])
  np.testing.assert_array_equal(ids, ref["text_ids"])
  np.testing.assert_array_equal(mask, ref["text_mask"])
  lengths = mask.sum(1)
  assert lengths.max() == strings["max_length"] and lengths.min() == 1  # truncated; empty = EOS
  assert (ids[np.arange(len(ids)), lengths - 1] == 1).all()             # EOS kept when truncated


def test_tokenizer_json_preferred_and_found_in_subfolder(tmp_path):
  shutil.copytree(TOKENIZER_DIR, tmp_path / "google" / "umt5-xxl")
  assert text.Tokenizer(str(tmp_path)).path.endswith(os.path.join("umt5-xxl", "tokenizer.json"))


def test_encode_matches_reference_and_zeros_padding(encoder, strings, ref):
  out = encoder.encode(strings["raw"])
  assert out.shape == ref["text_embeddings"].shape and out.dtype == np.float32
  err = np.abs(out - ref["text_embeddings"]).max() / np.abs(ref["text_embeddings"]).max()
  assert err <= 1e-5, err
  for row, n in zip(out, ref["text_mask"].sum(1)):
    assert (row[n:] == 0).all() and (np.abs(row[:n]).sum(-1) > 0).all()


def test_tokenizer_larger_than_vocab_raises():
  small = UMT5Config.tiny(vocab_size=300)  # the tokenizer has 356 ids
  with pytest.raises(WeightsError, match="356 ids but the encoder's vocabulary has 300"):
    text.TextEncoder.from_pretrained(os.path.join(FIXTURES, "wan_umt5.safetensors"),
                                     TOKENIZER_DIR, small)
  random_small = UMT5Encoder(small, rngs=nnx.Rngs(0))  # the constructor checks too
  with pytest.raises(WeightsError, match="does not match"):
    text.TextEncoder(text.Tokenizer(TOKENIZER_DIR), random_small, identity="x")


def test_missing_or_bad_tokenizer_files(tmp_path):
  with pytest.raises(WeightsError, match="no tokenizer.json or spiece.model"):
    text.Tokenizer(str(tmp_path))
  with pytest.raises(WeightsError, match="does not exist"):
    text.Tokenizer(str(tmp_path / "nope"))
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(WeightsError, match="not a readable tokenizer"):
    text.Tokenizer(str(tmp_path))


class CountingEncoder:
  """Wraps a TextEncoder and counts the prompts it encodes."""

  def __init__(self, inner, identity=None):
    self.inner, self.encoded = inner, []
    self.tokenizer, self.max_length, self.dim = inner.tokenizer, inner.max_length, inner.dim
    self.identity = identity or inner.identity

  def encode_cleaned(self, cleaned):
    self.encoded += list(cleaned)
    return self.inner.encode_cleaned(cleaned)


def test_prompt_cache_hits_on_second_call(encoder, strings, ref, tmp_path):
  counting = CountingEncoder(encoder)
  cache = text.PromptCache(str(tmp_path / "cache"), counting)
  prompts = strings["raw"] + strings["raw"][:1]  # a repeat inside one call is encoded once
  first = cache.get_or_encode(prompts)
  assert (cache.stats.hits, cache.stats.misses) == (0, len(strings["raw"]))
  assert len(counting.encoded) == len(strings["raw"])
  np.testing.assert_array_equal(first[:-1], encoder.encode(strings["raw"]))
  np.testing.assert_array_equal(first[-1], first[0])

  again = text.PromptCache(str(tmp_path / "cache"), counting)  # a new process, same directory
  second = again.get_or_encode(prompts)
  assert (again.stats.hits, again.stats.misses) == (len(prompts), 0)
  assert len(counting.encoded) == len(strings["raw"])  # the encoder did not run
  np.testing.assert_array_equal(second, first)
  files = os.listdir(tmp_path / "cache")
  assert not [f for f in files if f.startswith(".tmp")]
  with open(tmp_path / "cache" / "index.json") as f:
    index = json.load(f)
  assert sorted(e["prompt"] for e in index.values()) == sorted(strings["cleaned"])
  assert sorted(e["tokens"] for e in index.values()) == sorted(ref["text_mask"].sum(1).tolist())


def test_prompt_cache_misses_for_another_encoder_and_after_corruption(encoder, strings, tmp_path):
  cache = text.PromptCache(str(tmp_path), CountingEncoder(encoder))
  cache.get_or_encode(strings["raw"][:2])
  other = text.PromptCache(str(tmp_path), CountingEncoder(encoder, identity="other weights"))
  other.get_or_encode(strings["raw"][:2])
  assert (other.stats.hits, other.stats.misses) == (0, 2)

  key = cache.key(strings["cleaned"][0])
  (tmp_path / f"{key}.npy").write_bytes(b"truncated")  # a corrupt entry is encoded again
  fresh = text.PromptCache(str(tmp_path), CountingEncoder(encoder))
  out = fresh.get_or_encode(strings["raw"][:2])
  assert (fresh.stats.hits, fresh.stats.misses) == (1, 1)
  # the re-encoded prompt ran in a batch of 1: XLA's CPU matmuls round differently per shape
  np.testing.assert_allclose(out, encoder.encode(strings["raw"][:2]), rtol=0, atol=1e-5)
