"""Input pipeline without TensorFlow: tfds array_record sources read with grain.

  builder = moving_digits.prepare('tiny', data_dir)
  it = make_iterator(builder, 'train', batch_size=32, seed=0,
                     process_index=jax.process_index(),
                     process_count=jax.process_count())
  batch = next(it)                 # {'video': uint8 [B/P, T, H, W, C], ...}
  inputs = to_model_inputs(batch)  # video float32 in [-1, 1], labels int32

Order of operations (grain `MapDataset`, then `IterDataset`):
  source -> this process's shard -> shuffle(seed) -> repeat -> read in
  threads -> batch.
* `batch_size` is GLOBAL: each process yields batches of
  batch_size // process_count examples (must divide evenly).
* Sharding: the records are split into `process_count` contiguous, equal-size,
  disjoint slices (the last `len % process_count` records are never read, so
  all processes run the same number of steps). tfds already stores examples in
  a hash-shuffled order, so contiguous slices are not biased.
* Shuffling is a global permutation of the shard, different for every epoch
  (grain folds the epoch into the seed); deterministic for a seed.
* Batches may span an epoch boundary when repeating; with a finite number of
  epochs and drop_remainder=True only the final partial batch is dropped.
The returned iterator is a `grain.DatasetIterator`: it supports
`get_state()` / `set_state()` for checkpointing the input position.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from data.errors import DataError


def get_source(builder_or_source: Any, split: str | None = "train"):
  """Random-access source (len + __getitem__) for `split`.

  Accepts a tfds builder (uses `as_data_source(split)`), a path to a prepared
  tfds dataset dir (`<data_dir>/<name>/<config>/<version>`), a mapping
  split -> source (e.g. `builder.as_data_source()`), or a source itself (any
  sequence of example dicts; `split` is then ignored).
  """
  obj = builder_or_source
  if isinstance(obj, (str, os.PathLike)):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    path = os.fspath(obj)
    if not os.path.isfile(os.path.join(path, "dataset_info.json")):
      raise DataError(f"{path!r} is not a prepared tfds dataset directory")
    obj = tfds.builder_from_directory(path)
  if hasattr(obj, "as_data_source"):
    if split is None:
      raise DataError("split is required to read from a tfds builder")
    available = list(obj.info.splits.keys())
    if split not in available and "[" not in split:
      raise DataError(
          f"split {split!r} not in {obj.name} at {obj.data_dir}; available:"
          f" {available}"
      )
    return obj.as_data_source(split)
  if isinstance(obj, Mapping):
    if split not in obj:
      raise DataError(f"split {split!r} not in {sorted(obj)}")
    return obj[split]
  if not (hasattr(obj, "__len__") and hasattr(obj, "__getitem__")):
    raise DataError(
        f"cannot read from {type(obj).__name__}: need a tfds builder, a"
        " prepared dataset dir, a split mapping, or a random-access source"
    )
  return obj


def shard_range(num_records: int, process_index: int,
                process_count: int) -> tuple[int, int]:
  """[start, stop) of this process's equal-size, disjoint record slice."""
  per = num_records // process_count
  return process_index * per, (process_index + 1) * per


def _check_args(batch_size, process_index, process_count, num_epochs):
  for name, v in (("batch_size", batch_size), ("process_count", process_count),
                  ("process_index", process_index)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
      raise DataError(f"{name} must be an int, got {v!r}")
  if batch_size < 1:
    raise DataError(f"batch_size must be >= 1, got {batch_size}")
  if process_count < 1:
    raise DataError(f"process_count must be >= 1, got {process_count}")
  if not 0 <= process_index < process_count:
    raise DataError(
        f"process_index must be in [0, {process_count}), got {process_index}"
    )
  if batch_size % process_count:
    raise DataError(
        f"global batch_size {batch_size} is not divisible by process_count"
        f" {process_count}; each process must get the same per-process batch"
    )
  if num_epochs is not None and (
      not isinstance(num_epochs, (int, np.integer)) or num_epochs < 1):
    raise DataError(f"num_epochs must be None or an int >= 1, got {num_epochs}")


def make_dataset(
    builder_or_source: Any,
    split: str | None = "train",
    *,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    repeat: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = True,
    num_threads: int = 2,
    prefetch_buffer_size: int = 8,
):
  """The `grain.IterDataset` behind `make_iterator` (same arguments)."""
  import grain  # pylint: disable=g-import-not-at-top

  _check_args(batch_size, process_index, process_count, num_epochs)
  if not repeat:
    if num_epochs not in (None, 1):
      raise DataError(f"repeat=False conflicts with num_epochs={num_epochs}")
    num_epochs = 1
  source = get_source(builder_or_source, split)
  num_records = len(source)
  per_process_batch = batch_size // process_count
  start, stop = shard_range(num_records, process_index, process_count)
  shard_len = stop - start
  if shard_len < 1:
    raise DataError(
        f"{num_records} records cannot be sharded over {process_count}"
        " processes (each process needs at least one record)"
    )
  total = shard_len * (num_epochs or 1)
  if drop_remainder and num_epochs is not None and total < per_process_batch:
    raise DataError(
        f"per-process batch {per_process_batch} (= {batch_size} /"
        f" {process_count})"
        f" is larger than the {total} records this process reads"
        f" ({shard_len} per epoch x {num_epochs} epochs) and"
        " drop_remainder=True would yield no batch"
    )

  ds = grain.MapDataset.source(source)
  ds = ds[start:stop]
  if shuffle:
    ds = ds.shuffle(seed=int(seed))
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads,
                        prefetch_buffer_size=prefetch_buffer_size)
  )
  return ds.batch(per_process_batch, drop_remainder=drop_remainder)


def make_iterator(
    builder_or_source: Any,
    split: str | None = "train",
    *,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    repeat: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = True,
    num_threads: int = 2,
    prefetch_buffer_size: int = 8,
):
  """Iterator of batched dicts of numpy arrays (leading batch dim).

  Args:
    builder_or_source: tfds builder / prepared dataset dir / split mapping /
      random-access source (see `get_source`).
    split: e.g. 'train', 'test' (tfds slicing like 'train[:10%]' works too).
    batch_size: GLOBAL batch size; this process yields
      batch_size // process_count examples per batch.
    shuffle: globally shuffle (this process's shard), reshuffled every epoch.
    seed: shuffle seed.
    repeat: False: one epoch. True: `num_epochs` epochs (None: forever).
    num_epochs: see `repeat`.
    process_index, process_count: this process reads only its own disjoint
      slice (e.g. jax.process_index(), jax.process_count()).
    drop_remainder: drop a final partial batch.
    num_threads, prefetch_buffer_size: grain read threads / read-ahead.

  Returns:
    A `grain.DatasetIterator` (checkpointable with get_state/set_state)
    yielding raw features: uint8 video, int64 labels, etc.

  Raises:
    DataError: invalid sizes or a missing split.
  """
  return iter(make_dataset(
      builder_or_source, split, batch_size=batch_size, shuffle=shuffle,
      seed=seed, repeat=repeat, num_epochs=num_epochs,
      process_index=process_index, process_count=process_count,
      drop_remainder=drop_remainder, num_threads=num_threads,
      prefetch_buffer_size=prefetch_buffer_size,
  ))


def to_model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
  """Model-ready copy of a batch.

  'video' uint8 [B, T, H, W, C] -> float32 in [-1, 1] (x / 127.5 - 1);
  'labels' -> int32. Other entries are passed through unchanged.
  """
  if "video" not in batch:
    raise DataError(f"batch has no 'video' (keys: {sorted(batch)})")
  video = np.asarray(batch["video"])
  if video.dtype != np.uint8:
    raise DataError(f"expected uint8 video, got {video.dtype}")
  if video.ndim != 5:
    raise DataError(f"expected video [B, T, H, W, C], got shape {video.shape}")
  out = dict(batch)
  out["video"] = video.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  if "labels" in batch:
    out["labels"] = np.asarray(batch["labels"]).astype(np.int32)
  return out


def video_to_uint8(video: Any) -> np.ndarray:
  """Inverse of `to_model_inputs` for video: [-1, 1] floats -> uint8 0..255."""
  v = np.asarray(video, np.float32)
  return np.clip(np.rint((v + 1.0) * 127.5), 0, 255).astype(np.uint8)
