"""Stream checkpoints: everything that determines a video's next frame, saved every few chunks.

  <stream dir>/checkpoints/<n>/carry   orbax: {"carry": the carry after n chunks, "key": key data}
                               /meta    JSON: the fingerprint, n, frames written, labels,
                                        the cache capacity (slots) of the carry

The carry is the model's streaming state (`CausalDiT.init_carry`): per softmax layer K/V caches
[B, S*L, H, Dh] (S cache slots of L tokens), per hybrid layer the GDN state [B, H, Dh, Dh],
slot_chunk [S] and the chunk counter []. The sampler draws chunk n's noise from
fold_in(key, chunk), so carry + key + the conditioning labels (in meta) + the same parameters and
sampler settings continue the stream bit for bit. The fingerprint names those settings and a
digest of the parameters; a checkpoint whose fingerprint differs is refused with one line naming
the fields. Saves go through orbax (written to a temporary folder and renamed: a killed save
leaves no checkpoint, never a half one), the last K are kept, and a restore places the arrays
with the shardings of the mesh it restores onto, which may differ from the one that saved.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from typing import Any, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from hybrid_video import sharding as sharding_lib
from hybrid_video.checkpoint import FIELD_DEFAULTS, config_to_json
from hybrid_video.errors import CheckpointError
from hybrid_video.nn.model import Carry

# Model fields that choose a back-end or a training-only trade-off, not the frames: a stream may
# resume with them changed (e.g. on a machine where the Pallas kernels run).
IMPL_FIELDS = ("attention_impl", "memory_impl", "kernel_interpret", "gdn_chunk_size", "remat",
               "remat_policy", "scan_layers")
# Sampler fields that shape the frames (cache_chunks only sets the first cache size).
SAMPLER_FIELDS = ("kind", "timesteps", "shift", "num_steps", "clip_x0", "seed", "guidance")
# Subfolder of checkpoints/ where old checkpoints wait to be deleted.
TRASH = "trash"
# What a fork may change relative to its parent.
FORK_FREE = ("sampler.seed", "stream.num_frames", "fork")


def _flatten(d: Any, prefix: str) -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}.{k}"))
    return out
  return {prefix: d}


def _normal(v):
  """JSON round trip with lists as tuples, so saved and current values compare equal."""
  v = json.loads(json.dumps(v))
  def tup(x):
    return tuple(tup(y) for y in x) if isinstance(x, list) else x
  return tup(v)


def params_digest(state) -> str:
  """A short digest of a model's parameters: each leaf's path, shape, dtype and first row.
  Reads a few kilobytes per leaf (slices, no reduction, gathered by one jitted call), so it is
  cheap at Wan scale and the same on every mesh."""
  named = [(jax.tree_util.keystr(path), x)
           for path, x in jax.tree_util.tree_leaves_with_path(state)
           if hasattr(x, "dtype") and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
  rows = jax.jit(lambda xs: [x[(0,) * (x.ndim - 1)] if x.ndim > 1 else x for x in xs])(
      [x for _, x in named])
  h = hashlib.sha256()
  for (name, x), row in zip(named, rows):
    h.update(f"{name} {x.shape} {x.dtype}".encode())
    h.update(np.asarray(row).tobytes())
  return h.hexdigest()[:16]


def fingerprint(config, *, model_step: int, params: str, batch: int, frame_hw,
                num_frames: int, fork: dict | None = None) -> dict[str, Any]:
  """{"model.dim": 48, ..., "sampler.seed": 0, "stream.frame_hw": (16, 16), ...}: what must match
  for a saved stream to continue as the same video. fork: {"from": stream dir, "chunk": k}."""
  model = config_to_json(config.model)
  fp = {k: v for k, v in _flatten(model, "model").items()
        if k.split(".", 1)[1] not in IMPL_FIELDS}
  fp["model.step"] = int(model_step)
  fp["model.params"] = params
  for name in SAMPLER_FIELDS:
    fp[f"sampler.{name}"] = config.sampler.get(name, FIELD_DEFAULTS.get(f"sampler.{name}"))
  fp["stream.batch"] = int(batch)
  fp["stream.frame_hw"] = tuple(int(s) for s in frame_hw)
  fp["stream.num_frames"] = int(num_frames)
  fp["video.fps"] = int(config.video_fps)
  fp["video.upscale"] = int(config.video_upscale)
  fp["fork"] = fork
  return {k: _normal(v) for k, v in fp.items()}


def differences(saved: dict, current: dict, ignore: Iterable[str] = ()) -> list[str]:
  """['sampler.num_steps: 4 -> 8', ...] for fields that differ (saved -> current)."""
  ignore = set(ignore)
  out = []
  for key in sorted(set(saved) | set(current)):
    if key in ignore:
      continue
    absent = FIELD_DEFAULTS.get(key, "<absent>")  # fields newer than the saved stream
    a, b = _normal(saved.get(key, absent)), _normal(current.get(key, absent))
    if a != b:
      out.append(f"{key}: {a!r} -> {b!r}")
  return out


def abstract_carry(model, batch: int, frame_hw, capacity: int, mesh=None, rules=None) -> Carry:
  """ShapeDtypeStructs of a carry with `capacity` cache slots, with the shardings a
  ChunkRunner on `mesh` gives it (mesh None: the first local device)."""
  shapes = jax.eval_shape(lambda: model.init_carry(batch, tuple(frame_hw), capacity))
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, shapes)
  else:
    rules = rules if rules is not None else dict(sharding_lib.DEFAULT_RULES)
    shardings = sharding_lib.named(mesh, sharding_lib.carry_specs(shapes, rules, mesh))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def _name(path) -> str:
  return "-".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _flat(carry) -> dict[str, Any]:
  """{"layers-0-state": array, ...} without zero-size leaves (orbax refuses to save them; a
  model without softmax layers has an empty slot_chunk)."""
  return {_name(path): x for path, x in jax.tree_util.tree_flatten_with_path(carry)[0]
          if math.prod(x.shape)}


def _unflat(flat: dict, abstract: Carry) -> Carry:
  """The carry `abstract` describes, from `_flat`'s dict (zero-size leaves made empty)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  out = [flat[_name(path)] if math.prod(s.shape) else
         jax.device_put(np.zeros(s.shape, s.dtype), s.sharding) for path, s in leaves]
  return jax.tree.unflatten(treedef, out)


def capacity_of(carry: Carry) -> int:
  """Cache slots of a carry (0 for a model without softmax layers)."""
  return int(carry["slot_chunk"].shape[0])


class StreamCheckpointer:
  """Orbax CheckpointManager over <stream dir>/checkpoints/<chunk>/{carry, meta}.

  keep: checkpoints kept (the last K; 0 keeps all). read_only: open another stream's
  checkpoints (a fork's parent) without creating, cleaning or deleting anything.
  """

  def __init__(self, stream_dir: str, *, keep: int = 3, read_only: bool = False):
    self.stream_dir = os.path.abspath(stream_dir)
    self.directory = os.path.join(self.stream_dir, "checkpoints")
    # read_only is kept by never saving (orbax's own read_only mode logs a warning per field):
    # nothing is created, cleaned or deleted.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else (keep or None), create=not read_only,
        # A save killed before its rename leaves a temporary folder: never a checkpoint.
        cleanup_tmp_directories=not read_only,
        # Old checkpoints are renamed out of the way (atomic) before they are deleted: a process
        # killed while deleting one in place would leave a half-deleted checkpoint behind.
        todelete_subdir=TRASH)
    self.read_only = read_only
    self._empty_trash()
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("carry", "meta"))

  def chunks(self) -> list[int]:
    """Saved chunk indices, oldest first."""
    return sorted(self.manager.all_steps())

  def latest(self) -> int | None:
    chunks = self.chunks()
    return chunks[-1] if chunks else None

  def save(self, chunk: int, carry: Carry, key, meta: dict) -> None:
    """Save the carry after `chunk` chunks, the key and the JSON `meta`. Returns once the
    arrays are on the host (the carry may then be donated); the files are written in the
    background and appear, renamed into place, when complete (`wait`)."""
    if self.read_only:
      raise ValueError(f"{self.directory} was opened read-only")
    self._empty_trash()
    item = {"carry": _flat(carry), "key": jax.random.key_data(key)}
    self.manager.save(int(chunk), args=ocp.args.Composite(
        carry=ocp.args.StandardSave(item), meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self):
    self.manager.wait_until_finished()
    self._empty_trash()

  def _empty_trash(self):
    """Delete the checkpoints orbax renamed into the trash (no longer checkpoints)."""
    trash = os.path.join(self.directory, TRASH)
    if self.read_only or jax.process_index() != 0 or not os.path.isdir(trash):
      return
    for name in os.listdir(trash):
      shutil.rmtree(os.path.join(trash, name), ignore_errors=True)

  def meta(self, chunk: int) -> dict:
    """The JSON meta of checkpoint `chunk` (CheckpointError if unreadable)."""
    try:
      restored = self.manager.restore(chunk, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = dict(restored["meta"])
      if "fingerprint" not in meta or "chunk" not in meta:
        raise ValueError("meta lacks the fingerprint")
      return meta
    except Exception as e:  # orbax raises many types for damaged files
      raise CheckpointError(self._unreadable(chunk, e)) from None

  def check(self, chunk: int, current: dict, *, ignore: Iterable[str] = (),
            hint: str = "") -> dict:
    """Meta of `chunk` after checking its fingerprint against `current`; CheckpointError
    naming the fields that differ."""
    meta = self.meta(chunk)
    diffs = differences(meta["fingerprint"], current, ignore)
    if diffs:
      raise CheckpointError(
          f"the stream checkpoint at chunk {chunk} in {self.directory} was made by another "
          f"model or config; fields that differ (checkpoint -> now): {'; '.join(diffs)}."
          f"{hint}")
    return meta

  def restore(self, chunk: int, abstract: Carry) -> tuple[Carry, jax.Array]:
    """(carry, key) of checkpoint `chunk`, placed as `abstract` says (see `abstract_carry`)."""
    sharding = jax.tree.leaves(abstract)[0].sharding
    replicated = (NamedSharding(sharding.mesh, P()) if isinstance(sharding, NamedSharding)
                  else sharding)
    key_shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    target = {"carry": _flat(abstract),
              "key": jax.ShapeDtypeStruct(key_shape.shape, key_shape.dtype, sharding=replicated)}
    try:
      restored = self.manager.restore(chunk, args=ocp.args.Composite(
          carry=ocp.args.StandardRestore(target)))["carry"]
    except Exception as e:  # orbax raises many types for damaged files
      raise CheckpointError(self._unreadable(chunk, e)) from None
    return _unflat(restored["carry"], abstract), jax.random.wrap_key_data(restored["key"])

  def readable(self, chunk: int) -> bool:
    """Whether checkpoint `chunk` has readable meta and array metadata (reads no arrays)."""
    try:
      self.meta(chunk)
      self.manager.item_metadata(chunk)
      return True
    except Exception:  # pylint: disable=broad-except
      return False

  def _unreadable(self, chunk: int, e: Exception) -> str:
    older = [c for c in self.chunks() if c < chunk]
    good = next((c for c in reversed(older) if self.readable(c)), None)
    hint = (f" The previous good one is chunk {good}: resume from it with "
            f"--config.sampler.resume_chunk={good}." if good is not None else
            " No older stream checkpoint is readable; remove this stream's folder to start over.")
    msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    return (f"stream checkpoint at chunk {chunk} in {self.directory} is unreadable or corrupt "
            f"({type(e).__name__}: {msg}); nothing was deleted.{hint}")

  def discard_after(self, chunk: int) -> list[int]:
    """Move checkpoints newer than `chunk` to <stream dir>/discarded/ (a resume from an older
    chunk overwrites their chunks; nothing is deleted). Returns the moved chunks."""
    moved = [c for c in self.chunks() if c > chunk]
    if not moved:
      return []
    target = os.path.join(self.stream_dir, "discarded")
    for c in moved if jax.process_index() == 0 else ():
      os.makedirs(target, exist_ok=True)
      dest, i = os.path.join(target, str(c)), 1
      while os.path.exists(dest):
        dest, i = os.path.join(target, f"{c}.{i}"), i + 1
      shutil.move(os.path.join(self.directory, str(c)), dest)  # a rename: atomic
    self.manager.reload()
    return moved

  def close(self):
    self.manager.close()
