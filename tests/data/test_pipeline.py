"""Tests for data/pipeline.py (grain over tfds array_record, no TensorFlow)."""

import sys

import numpy as np
import pytest

from data import DataError
from data import moving_digits as md
from data import pipeline


def _records(n):
  return [{"id": np.int64(i), "video": np.full((2, 3, 3, 1), i % 256, np.uint8),
           "labels": np.array([i % 10], np.int64)} for i in range(n)]


def _ids(batches):
  return [int(i) for b in batches for i in b["id"]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return md.prepare("tiny", tmp_path_factory.mktemp("tfds"))


def test_batches_from_builder_and_dir_without_tensorflow(tiny):
  it = pipeline.make_iterator(tiny, "train", batch_size=8, seed=0)
  batch = next(it)
  assert batch["video"].shape == (8, 4, 16, 16, 1)
  assert batch["video"].dtype == np.uint8
  assert batch["labels"].shape == (8, 1) and batch["labels"].dtype == np.int64
  assert batch["positions"].shape == (8, 4, 1, 2)
  inputs = pipeline.to_model_inputs(batch)
  assert inputs["video"].dtype == np.float32
  assert inputs["video"].shape == (8, 4, 16, 16, 1)
  assert -1.0 <= inputs["video"].min() and inputs["video"].max() <= 1.0
  assert inputs["labels"].dtype == np.int32
  np.testing.assert_array_equal(pipeline.video_to_uint8(inputs["video"]),
                                batch["video"])
  # From the prepared dataset directory, one epoch of the test split.
  test = list(pipeline.make_iterator(tiny.data_dir, "test", batch_size=4,
                                     repeat=False, shuffle=False))
  assert len(test) == 16 // 4
  assert "tensorflow" not in sys.modules


def test_shuffle_is_seeded_permutation_reshuffled_each_epoch():
  src = _records(32)
  def epochs(seed, n=2):
    it = pipeline.make_iterator(src, batch_size=4, seed=seed)
    ids = _ids(next(it) for _ in range(8 * n))
    return [ids[i * 32:(i + 1) * 32] for i in range(n)]
  e0, e1 = epochs(seed=0)
  assert sorted(e0) == sorted(e1) == list(range(32))
  assert e0 != list(range(32))
  assert e0 != e1  # Reshuffled every epoch.
  assert epochs(seed=0) == [e0, e1]  # Deterministic.
  assert epochs(seed=1)[0] != e0
  unshuffled = pipeline.make_iterator(src, batch_size=4, shuffle=False,
                                      repeat=False)
  assert _ids(unshuffled) == list(range(32))


def test_repeat_epochs_and_remainder():
  src = _records(10)
  assert len(list(pipeline.make_iterator(src, batch_size=4,
                                         repeat=False))) == 2
  batches = list(pipeline.make_iterator(src, batch_size=4, repeat=False,
                                        drop_remainder=False))
  assert [len(b["id"]) for b in batches] == [4, 4, 2]
  assert sorted(_ids(batches)) == list(range(10))
  batches = list(pipeline.make_iterator(src, batch_size=4, num_epochs=3))
  assert len(batches) == 30 // 4
  forever = pipeline.make_iterator(src, batch_size=4)
  ids = _ids(next(forever) for _ in range(25))
  assert len(ids) == 100 and sorted(ids) == sorted(list(range(10)) * 10)


def test_shards_are_disjoint_across_two_processes(tiny):
  src = _records(33)  # Odd: one record is left out so shards stay equal.
  shard_ids = []
  for p in range(2):
    batches = list(pipeline.make_iterator(
        src, batch_size=4, seed=3, repeat=False, process_index=p,
        process_count=2))
    assert all(b["id"].shape == (2,) for b in batches)  # 4 global / 2.
    shard_ids.append(_ids(batches))
  assert len(shard_ids[0]) == len(shard_ids[1]) == 16
  assert not set(shard_ids[0]) & set(shard_ids[1])
  assert len(set(shard_ids[0]) | set(shard_ids[1])) == 32
  # Same on the tfds builder, with repeat: each process only sees its slice.
  seen = []
  for p in range(2):
    it = pipeline.make_iterator(tiny, "train", batch_size=8, seed=0,
                                process_index=p, process_count=2)
    videos = np.concatenate([next(it)["video"] for _ in range(20)])
    assert videos.shape[0] == 80
    seen.append({v.tobytes() for v in videos})
  assert len(seen[0]) == len(seen[1]) == 32
  assert not seen[0] & seen[1]


def test_iterator_state_restores_position():
  src = _records(20)
  it = pipeline.make_iterator(src, batch_size=4, seed=5)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it)["id"] for _ in range(4)]
  it2 = pipeline.make_iterator(src, batch_size=4, seed=5)
  it2.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(it2)["id"], e)


def test_validation_errors(tiny):
  src = _records(8)
  with pytest.raises(DataError, match="divisible by process_count"):
    pipeline.make_iterator(src, batch_size=5, process_count=2)
  with pytest.raises(DataError, match="process_index"):
    pipeline.make_iterator(src, batch_size=4, process_index=2, process_count=2)
  with pytest.raises(DataError, match="batch_size"):
    pipeline.make_iterator(src, batch_size=0)
  with pytest.raises(DataError, match="no batch"):
    pipeline.make_iterator(src, batch_size=16, repeat=False)
  with pytest.raises(DataError, match="sharded"):
    pipeline.make_iterator(_records(1), batch_size=2, process_count=2)
  with pytest.raises(DataError, match="validation"):
    pipeline.make_iterator(tiny, "validation", batch_size=2)
  with pytest.raises(DataError, match="uint8"):
    pipeline.to_model_inputs({"video": np.zeros((1, 1, 1, 1, 1), np.float32)})
