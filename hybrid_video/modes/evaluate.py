"""--mode=eval: long-horizon continuation of moving_digits test clips, against the true dynamics.

For each test clip, the first k ground-truth frames (eval.context_frames, whole chunks) go
through context passes (t = 0, write=True: the teacher-forced clean history); the model then
streams M more frames (eval.num_frames, up to any multiple of the 8-frame training clips) with
the sampler's per-chunk step. The ground truth for all k + M frames is rendered from the clip's
own dynamics (`moving_digits.regenerate_clip`: the same digit images, start and velocity,
bouncing off the walls), so every generated frame has an exact reference.

Per generated frame (index 0 = the first frame after the context) and per horizon bucket
(eval.bucket_clips, in training-clip lengths):
  psnr, ssim        vs the true frame (hybrid_video/video_metrics.py)
  retention         the digit classifier reads the same digit in the generated frame as in
                    the true frame, both cropped at the digit's true position (a crop with no
                    ink reads as "no digit" and is not retained)
  label_accuracy    the classifier's reading of the generated crop equals the clip's label
  position_error    pixels between the digit's true top-left and its template-matched
                    top-left in the generated frame, searched within eval.search_radius; a digit
                    with no ink in the searched area is lost and scores radius * sqrt(2)
  lost              fraction of digits lost
  identity_after_gap  exits data (digits leave the canvas and come back): the generated digit,
                    wherever it is, read as the clip's label in the eval.gap_window frames after
                    the true digit is wholly back on the canvas; the digit metrics above count
                    only frames where the true digit is wholly on the canvas
With eval.condition='null' label models get the null label, so identity must come from the
context frames; with eval.num_seeds > 1 every figure is a mean over seeds with its standard
deviation ("spread" in eval.json, "mean±std" in the table).
Two baselines are evaluated alongside the models: "last_frame" (the last context frame repeated)
and "blank" (an empty canvas). The canvas is mostly background, so a blank frame already scores
SSIM ~0.6 and PSNR ~15 dB; read the models against these floors.

Checkpoints: --config.eval.workdirs=ENTRY[,ENTRY...], ENTRY = [LABEL=]WORKDIR[+FIELD=VALUE...], where
FIELD is a model field a checkpoint does not fix (e.g. memory.write_during_denoising), so
  --config.eval.workdirs=teacher=runs/softmax,arl2=runs/arl2,\
arl2_noisy=runs/arl2+memory.write_during_denoising=true
compares three settings side by side on the same clips and sampling noise. Without the flag the
checkpoint in --workdir is evaluated. Results go to <workdir>/eval/.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from data import digit_metrics, moving_digits
from data.digit_metrics import GroundTruth
from hybrid_video import inputs as inputs_lib
from hybrid_video import video_metrics
from hybrid_video.errors import UserError
from hybrid_video.restore import load_model, parse_override_value
from hybrid_video.run_info import blas_threads_limit, hardware_info, provenance
from hybrid_video.streaming import ChunkRunner, continue_clips
from hybrid_video.video_io import to_unit

BASELINES = ("last_frame", "blank")  # the last context frame repeated; an empty canvas


@dataclasses.dataclass
class EvalEntry:
  label: str
  workdir: str
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


def parse_eval_workdirs(spec: str | None, default_workdir: str) -> list[EvalEntry]:
  """'[LABEL=]WORKDIR[+FIELD=VALUE...],...' -> entries (see module docstring)."""
  if not spec:
    return [EvalEntry(os.path.basename(os.path.normpath(default_workdir)) or "model",
                      default_workdir)]
  entries = []
  for item in spec.split(","):
    item = item.strip()
    if not item:
      continue
    head, *over = item.split("+")
    label, path = head.split("=", 1) if "=" in head else (None, head)
    if not path:
      raise UserError(f"--config.eval.workdirs entry {item!r} has no workdir")
    overrides = {}
    for o in over:
      if "=" not in o:
        raise UserError(f"--config.eval.workdirs override {o!r} in {item!r} must be FIELD=VALUE")
      k, v = o.split("=", 1)
      overrides[k.strip()] = parse_override_value(v)
    if label is None:
      label = os.path.basename(os.path.normpath(path)) + "".join(
          f"+{k}={v}" for k, v in overrides.items())
    entries.append(EvalEntry(label, path, overrides))
  labels = [e.label for e in entries]
  if len(set(labels)) != len(labels) or set(labels) & set(BASELINES):
    raise UserError(f"--config.eval.workdirs labels must be unique and not {BASELINES}: {labels}")
  if not entries:
    raise UserError("--config.eval.workdirs is empty")
  return entries


# -- ground truth ----------------------------------------------------------------------------------


def load_ground_truth(config, num_videos: int, total_frames: int) -> GroundTruth:
  """The first `num_videos` test clips, re-rendered for `total_frames` frames."""
  if config.data.source != "moving_digits":
    raise UserError(f"--mode=eval needs data.source='moving_digits' (known dynamics), got "
                    f"{config.data.source!r}")
  source = inputs_lib.make_split_source(config, "test")
  if num_videos > len(source):
    raise UserError(f"eval.num_videos={num_videos} exceeds the {len(source)} test clips")
  return digit_metrics.ground_truth(source, moving_digits.get_config(config.data.config),
                                    num_videos, total_frames)


# -- metrics ---------------------------------------------------------------------------------------


def frame_metrics(generated: np.ndarray, truth: np.ndarray, top_left: np.ndarray,
                  templates: np.ndarray, classifier, *, radius: int, ink_threshold: float,
                  psnr_cap: float, truth_pred: np.ndarray | None = None,
                  visible: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Per-frame metrics. generated, truth [V, M, H, W, C] in [0, 1]; top_left int [V, M, n, 2]
  (true positions; off the canvas for exits data); templates [V, n, s, s]; truth_pred:
  `truth_labels(...)` of these truth frames, computed when None; visible bool [V, M, n]: the
  digit wholly on the canvas (None: always). Returns psnr, ssim [V, M] and retained, label_pred,
  truth_pred, position_error, lost, visible [V, M, n]; the digit metrics of frames where a digit
  is not visible are meaningless and left out of `summarize`'s means."""
  generated = np.asarray(generated, np.float32)
  truth = np.asarray(truth, np.float32)
  size = templates.shape[-1]
  top_left = on_canvas(top_left, generated.shape[-3:-1], size)
  gray_gen = generated.mean(axis=-1)
  pred = classifier.predict(digit_metrics.crops(gray_gen, top_left, size))
  if truth_pred is None:
    truth_pred = truth_labels(truth, top_left, size, classifier)
  found, lost = digit_metrics.locate_digits(gray_gen, templates[:, None], top_left,
                                           radius=radius, ink_threshold=ink_threshold)
  error = np.linalg.norm((found - top_left).astype(np.float64), axis=-1)
  error = np.where(lost, radius * math.sqrt(2.0), error)
  return {
      "psnr": video_metrics.psnr(generated, truth, cap=psnr_cap),
      "ssim": video_metrics.ssim(generated, truth),
      "retained": (pred == truth_pred) & (pred >= 0),
      "label_pred": pred,
      "truth_pred": truth_pred,
      "position_error": error,
      "lost": lost,
      "visible": np.ones(pred.shape, bool) if visible is None else np.asarray(visible, bool),
  }


def on_canvas(top_left: np.ndarray, frame_hw, size: int) -> np.ndarray:
  """Positions moved onto the canvas (crops must lie inside frames; only exits data has digits
  off it, and those frames are masked out of the digit metrics)."""
  h, w = frame_hw
  return np.clip(np.asarray(top_left, np.int64), 0, np.array([h - size, w - size]))


def truth_labels(truth: np.ndarray, top_left: np.ndarray, size: int, classifier) -> np.ndarray:
  """The classifier's labels of the true digits [V, M, n] (the reference for retention)."""
  gray = np.asarray(truth, np.float32).mean(axis=-1)
  top_left = on_canvas(top_left, gray.shape[-2:], size)
  return classifier.predict(digit_metrics.crops(gray, top_left, size))


def gap_identity(generated: np.ndarray, gt: GroundTruth, context_frames: int, classifier, *,
                 window: int, ink_threshold: float) -> dict:
  """Identity after the gap (exits data): for each clip whose digit returns to the canvas within
  the generated frames, the fraction of the `window` generated frames from its return whose
  digit (the largest blob, wherever it is) the classifier reads as the clip's label
  (digit_metrics.identity_after_gap). The label the model was given (or the null label) is
  not used: with eval.condition='null' the identity can only come from the context frames.
  Returns {"identity_after_gap": mean over those clips (None without any), "gap_clips": their
  number, "per_clip": [value or None]}."""
  per_clip = []
  if gt.gap_end is None or gt.labels.shape[1] != 1:
    return {"identity_after_gap": None, "gap_clips": 0, "per_clip": []}
  gray = np.asarray(generated, np.float32).mean(axis=-1)
  for v in range(gray.shape[0]):
    end = int(gt.gap_end[v, 0]) - context_frames  # index in the generated frames (-1: none)
    if not 0 <= end < gray.shape[1]:
      per_clip.append(None)
      continue
    per_clip.append(digit_metrics.identity_after_gap(
        gray[v], int(gt.labels[v, 0]), end, classifier, window=window,
        ink_threshold=ink_threshold))
  values = [x for x in per_clip if x is not None]
  return {"identity_after_gap": float(np.mean(values)) if values else None,
          "gap_clips": len(values), "per_clip": per_clip}


def bucket_edges(num_frames: int, clip_frames: int, bucket_clips) -> list[tuple[int, int]]:
  """[(start, stop)) frame ranges: edges at multiples of the clip length, cut at num_frames."""
  edges = [0] + [int(round(b * clip_frames)) for b in bucket_clips]
  edges = sorted({min(e, num_frames) for e in edges} | {num_frames})
  return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


DIGIT_METRICS = ("retention", "label_accuracy", "position_error", "lost")  # where visible


def summarize(m: dict[str, np.ndarray], labels: np.ndarray, buckets) -> dict:
  """Means over clips (and digits) per frame, per bucket and overall. The digit metrics count
  only frames where the digit is wholly on the canvas (m["visible"]); None where none is."""
  label_ok = m["label_pred"] == labels[:, None, :]
  series = {
      "psnr": m["psnr"], "ssim": m["ssim"], "retention": m["retained"].astype(np.float64),
      "label_accuracy": label_ok.astype(np.float64),
      "position_error": m["position_error"], "lost": m["lost"].astype(np.float64),
  }
  visible = m.get("visible")
  if visible is None:
    visible = np.ones(m["retained"].shape, bool)

  def mean(key, a=0, b=None):
    x = series[key][:, a:b]
    if key not in DIGIT_METRICS:
      return float(np.mean(x))
    w = visible[:, a:b]
    return float(np.sum(x * w) / np.sum(w)) if w.any() else None

  per_frame = {k: [mean(k, j, j + 1) for j in range(series[k].shape[1])] for k in series}
  out_buckets = [{"frames": [a, b], **{k: mean(k, a, b) for k in series}} for a, b in buckets]
  overall = {k: mean(k) for k in series}
  return {"per_frame": per_frame, "buckets": out_buckets, "overall": overall}


def mean_over_seeds(summaries: list[dict]) -> dict:
  """The mean of per-seed `summarize` results (same structure), with "spread": the sample
  standard deviation over seeds of every bucket and overall figure (None for one seed)."""
  def combine(values, fn):
    if isinstance(values[0], dict):
      return {k: values[0][k] if k == "frames" else combine([v[k] for v in values], fn)
              for k in values[0]}
    if isinstance(values[0], list):
      return [combine(list(x), fn) for x in zip(*values)]
    if values[0] is None or isinstance(values[0], (str, bool)) or any(v is None for v in values):
      return values[0] if all(v == values[0] for v in values) else None
    return fn(np.asarray(values, np.float64))

  out = combine(summaries, lambda x: float(np.mean(x)))
  if "gap" in out:  # the clips that return are the ground truth's, the same for every seed
    out["gap"]["gap_clips"] = summaries[0]["gap"]["gap_clips"]
  if len(summaries) > 1:
    std = lambda x: float(np.std(x, ddof=1))
    out["spread"] = {"buckets": combine([s["buckets"] for s in summaries], std),
                     "overall": combine([s["overall"] for s in summaries], std)}
    if "gap" in summaries[0]:
      out["spread"]["gap"] = combine([s["gap"] for s in summaries], std)
  else:
    out["spread"] = None
  return out


# -- streaming -------------------------------------------------------------------------------------


def continue_ground_truth(runner: ChunkRunner, gt: GroundTruth, *, context_frames: int,
                          num_frames: int, seed: int, labels: np.ndarray | None,
                          progress: bool = True, desc: str = "eval") -> np.ndarray:
  """Feed k true frames, generate M more (streaming.continue_clips) conditioned on `labels`
  [V, n] (None: an unconditional model). Returns float [V, M, H, W, C] in [0, 1]."""
  f = runner.model.frames_per_chunk
  num_videos, b = gt.video.shape[0], runner.batch
  bar = tqdm(total=math.ceil(num_videos / b) * (context_frames // max(f, 1) +
                                                math.ceil(num_frames / f)),
             desc=desc, unit="chunk", disable=not progress)
  videos = gt.video.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  out = continue_clips(runner, videos, labels, context_frames=context_frames,
                       num_frames=num_frames, seed=seed, on_chunk=lambda: bar.update(1))
  bar.close()
  return to_unit(out)


CONDITIONS = ("label", "null")
CONDITION_WORDS = {"label": "each clip's label", "null": "the null label"}
SEED_STRIDE = 1_000_003  # seed i of eval.num_seeds is eval.seed + i * SEED_STRIDE; clips within a
#                          run use key(seed + clip batch start), so seeds never share noise


def eval_labels(condition: str, model, mcfg, gt: GroundTruth, label: str) -> np.ndarray | None:
  """What the model is conditioned on: the clips' labels, the null label, or nothing."""
  if condition not in CONDITIONS:
    raise UserError(f"eval.condition={condition!r} must be one of {CONDITIONS}")
  if mcfg.model.cond != "labels":
    return None
  if condition == "label":
    return gt.labels
  if model.null_label_index is None:
    raise UserError(f"eval.condition='null' needs models trained with a null label "
                    f"(model.null_label); {label} has none")
  return np.full_like(gt.labels, model.null_label_index)


def eval_seeds(ecfg) -> list[int]:
  n = int(ecfg.get("num_seeds", 1) or 1)
  if n < 1:
    raise UserError(f"eval.num_seeds must be >= 1, got {n}")
  return [int(ecfg.seed) + i * SEED_STRIDE for i in range(n)]


# -- main ------------------------------------------------------------------------------------------


def evaluate_main(config, workdir: str, *, overrides=None) -> dict:
  """--mode=eval: evaluate each entry; write <workdir>/eval/{eval.json, *.png}; print a table."""
  ecfg = config.eval
  progress, checkpoint_step = bool(config.progress), config.train.resume_step
  entries = parse_eval_workdirs(ecfg.workdirs, workdir)
  k, m_frames = int(ecfg.context_frames), int(ecfg.num_frames)
  if m_frames < 1 or int(ecfg.num_videos) < 1 or int(ecfg.batch_size) < 1:
    raise UserError("eval.num_frames, eval.num_videos and eval.batch_size must be >= 1")
  condition = str(ecfg.get("condition", "label"))  # checked by eval_labels (per model)
  seeds = eval_seeds(ecfg)
  gap_window = int(ecfg.get("gap_window", 8))
  results: dict[str, Any] = {"entries": {}, "settings": ecfg.to_dict(), "seeds": seeds,
                             "condition": condition,
                             "hardware": hardware_info(), "provenance": provenance()}
  gt = None
  data_key = None
  generated_samples = {}
  with blas_threads_limit(1):
    for entry in entries:
      t0 = time.perf_counter()
      model, mcfg, step = load_model(config, entry.workdir,
                                     checkpoint_step if len(entries) == 1 else None,
                                     model_overrides=entry.overrides, cli_overrides=overrides)
      key = json.dumps(mcfg.data.to_dict(), sort_keys=True, default=str)
      if gt is None:
        data_key = key
        gt = load_ground_truth(mcfg, int(ecfg.num_videos), k + m_frames)
        radius = int(ecfg.search_radius) or gt.digit_size
        classifier = digit_metrics.digit_classifier(gt.digit_size, gt.interpolation,
                                                   float(ecfg.ink_threshold))
        truth = gt.frames01[:, k:]
        top_left = gt.top_left[:, k:]
        visible = None if gt.visible is None else gt.visible[:, k:]
        buckets = bucket_edges(m_frames, gt.clip_frames, ecfg.bucket_clips)
        truth_pred = truth_labels(truth, top_left, gt.digit_size, classifier)  # once for all
        metric_args = dict(radius=radius, ink_threshold=float(ecfg.ink_threshold),
                           psnr_cap=float(ecfg.psnr_cap), truth_pred=truth_pred,
                           visible=visible)
        gap_args = dict(window=gap_window, ink_threshold=float(ecfg.ink_threshold))
        results.update(_common(config, mcfg, gt, classifier, truth_pred, buckets, radius, k,
                               m_frames))
        results["baselines"] = {}
        for name, frames in (("last_frame", np.repeat(gt.frames01[:, k - 1:k], m_frames, axis=1)),
                             ("blank", np.zeros_like(truth))):
          bm = frame_metrics(frames, truth, top_left, gt.templates, classifier, **metric_args)
          results["baselines"][name] = {
              **summarize(bm, gt.labels, buckets), "spread": None,
              "gap": gap_identity(frames, gt, k, classifier, **gap_args)}
      elif key != data_key:
        raise UserError(f"{entry.workdir} was trained on other data ({mcfg.data.config}); "
                        "every --config.eval.workdirs entry must share the data config")
      labels = eval_labels(condition, model, mcfg, gt, entry.label)
      runner = ChunkRunner(model, config.sampler, batch=min(int(ecfg.batch_size),
                                                            int(ecfg.num_videos)),
                           frame_hw=gt.video.shape[2:4])
      per_seed = []
      for i, seed in enumerate(seeds):
        desc = entry.label + (f" seed {i + 1}/{len(seeds)}" if len(seeds) > 1 else "")
        gen = continue_ground_truth(runner, gt, context_frames=k, num_frames=m_frames,
                                    seed=seed, labels=labels, progress=progress, desc=desc)
        fm = frame_metrics(gen, truth, top_left, gt.templates, classifier, **metric_args)
        per_seed.append({**summarize(fm, gt.labels, buckets),
                         "gap": gap_identity(gen, gt, k, classifier, **gap_args)})
        if i == 0:
          generated_samples[entry.label] = gen[0]
      stream_seconds = time.perf_counter() - t0
      results["entries"][entry.label] = {
          "workdir": os.path.abspath(entry.workdir), "step": step,
          "overrides": entry.overrides,
          "model": {"hybrid_layers": list(model.hybrid_layers),
                    "num_layers": len(model.blocks),
                    "memory_read": mcfg.model.memory.read,
                    "write_during_denoising": bool(mcfg.model.memory.write_during_denoising),
                    "memory_impl": mcfg.model.memory_impl,
                    "kv_cache": mcfg.model.kv_cache.to_dict()},
          "compiles": {"generate": runner.compiles, "feed": len(runner.feed_traces)},
          "seconds": stream_seconds,
          **mean_over_seeds(per_seed),
          "per_seed": [{"seed": sd, "overall": p["overall"], "gap": p["gap"]}
                       for sd, p in zip(seeds, per_seed)],
      }
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  results["plots"] = [plot_curves(results, out_dir),
                      plot_samples(gt, generated_samples, k, out_dir)]
  path = os.path.join(out_dir, "eval.json")
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  results["json"] = path
  print(table(results))
  print(f"wrote {path} and {', '.join(results['plots'])}")
  return results


def _common(config, mcfg, gt: GroundTruth, classifier, truth_pred, buckets, radius, k,
            m_frames) -> dict:
  ok = truth_pred == gt.labels[:, None]
  visible = None if gt.visible is None else gt.visible[:, k:]
  ceiling = float(np.mean(ok) if visible is None else np.sum(ok & visible) / max(visible.sum(), 1))
  return {
      "data": mcfg.data.to_dict(),
      "sampler": config.sampler.to_dict(),
      "context_frames": k,
      "num_frames": m_frames,
      "num_videos": int(gt.video.shape[0]),
      "clip_frames": gt.clip_frames,
      "horizon_clips": m_frames / gt.clip_frames,
      "buckets": [list(b) for b in buckets],
      "search_radius": radius,
      "classifier": {"kind": "RBF SVM on max-normalised digit crops, +-1 px shift augmentation",
                     "train_accuracy": classifier.train_accuracy,
                     "test_accuracy": classifier.test_accuracy,
                     "label_accuracy_on_true_frames": ceiling},
      "method": __doc__,
  }


# -- output ----------------------------------------------------------------------------------------


def _rows(results: dict):
  for label, e in results["baselines"].items():
    yield f"{label} (baseline)", e
  for label, e in results["entries"].items():
    yield label, e


def _fmt(value, spread, digits: int) -> str:
  if value is None:
    return "-"
  out = f"{value:.{digits}f}"
  return out if spread is None else f"{out}±{spread:.{digits}f}"


def table(results: dict) -> str:
  """Every bucket and the whole horizon of every row; 'mean±std' over seeds with several."""
  clip = results["clip_frames"]
  gap = any(e.get("gap", {}).get("gap_clips") for _, e in _rows(results))
  head = ("model", "frames", "PSNR", "SSIM", "retention", "label acc", "pos err px", "lost")
  head += ("id after gap",) if gap else ()
  rows = [head]
  formats = (("psnr", 2), ("ssim", 3), ("retention", 3), ("label_accuracy", 3),
             ("position_error", 2), ("lost", 3))
  for label, e in _rows(results):
    spread = e.get("spread") or {}
    spans = e["buckets"] + [{"frames": [0, results["num_frames"]], **e["overall"]}]
    spreads = spread.get("buckets", [None] * len(e["buckets"])) + [spread.get("overall")]
    if len(e["buckets"]) == 1:  # one bucket = the whole horizon: one row
      spans, spreads = spans[1:], spreads[1:]
    for i, (bk, sp) in enumerate(zip(spans, spreads)):
      a, b = bk["frames"]
      whole = (a, b) == (0, results["num_frames"])
      row = (label, f"{a}-{b}" + (" (all)" if whole else ""))
      row += tuple(_fmt(bk[key], None if sp is None else sp[key], d) for key, d in formats)
      if gap:
        g, gs = e.get("gap") or {}, spread.get("gap") or {}
        row += (_fmt(g.get("identity_after_gap"), gs.get("identity_after_gap"), 3)
                if i == len(spans) - 1 else "",)
      rows.append(row)
  widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
  lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                     enumerate(zip(r, widths))) for r in rows]
  lines.insert(1, "-" * len(lines[0]))
  c = results["classifier"]
  seeds = results.get("seeds", [0])
  lines.append(f"{results['num_videos']} test clips, {results['context_frames']} context frames, "
               f"{results['num_frames']} generated frames (= {results['horizon_clips']:g}x the "
               f"{clip}-frame training clips), conditioned on "
               f"{CONDITION_WORDS[results.get('condition', 'label')]}, {len(seeds)} seed(s)"
               f"{' (mean±std)' if len(seeds) > 1 else ''}; digit classifier: "
               f"{100 * c['test_accuracy']:.1f}% on the held-out digits, "
               f"{100 * c['label_accuracy_on_true_frames']:.1f}% label accuracy on the true "
               "frames")
  if gap:
    n = next(e["gap"]["gap_clips"] for _, e in _rows(results) if e.get("gap"))
    lines.append(f"id after gap: the generated digit read as the clip's label in the "
                 f"{results['settings'].get('gap_window', 8)} frames after it returns to the "
                 f"canvas ({n} clips return within the generated frames)")
  return "\n".join(lines)


def plot_curves(results: dict, out_dir: str) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  metrics = (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("retention", "digit identity retention"),
             ("label_accuracy", "label accuracy"), ("position_error", "position error (px)"),
             ("lost", "digit lost (fraction)"))
  fig, axes = plt.subplots(2, 3, figsize=(15, 8))
  clip = results["clip_frames"]
  for ax, (key, title) in zip(axes.flat, metrics):
    for label, e in _rows(results):
      y = np.asarray(e["per_frame"][key])
      x = np.arange(1, len(y) + 1)
      base = label.endswith("(baseline)")
      ax.plot(x, y, lw=1.2, ls=(":" if "blank" in label else "--") if base else "-",
              color="gray" if base else None, label=label)
    for edge in range(clip, results["num_frames"] + 1, clip):
      ax.axvline(edge, color="k", lw=0.4, alpha=0.2)
    ax.set(title=title, xlabel=f"generated frame (grid: {clip}-frame training clip lengths)")
    ax.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=8)
  fig.suptitle(f"{results['num_videos']} moving_digits test clips, {results['context_frames']} "
               f"context frames, means over clips", fontsize=10)
  fig.tight_layout()
  path = os.path.join(out_dir, "eval_curves.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_samples(gt: GroundTruth, generated: dict[str, np.ndarray], k: int, out_dir: str) -> str:
  """The first clip: truth and each model at a few horizons."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  m = next(iter(generated.values())).shape[0] if generated else gt.video.shape[1] - k
  clip = gt.clip_frames
  cols = {0, clip - 1, 2 * clip - 1, 4 * clip - 1, m // 2, m - 1} & set(range(m))
  if len(cols) < 6:  # a horizon of about one clip: evenly spaced frames instead
    cols |= {int(round(x)) for x in np.linspace(0, m - 1, 8)}
  cols = sorted(cols)
  rows = [("truth", gt.frames01[0, k:])] + list(generated.items())
  fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.4 * len(cols) + 1, 1.5 * len(rows)),
                           squeeze=False)
  for r, (label, frames) in enumerate(rows):
    for c, j in enumerate(cols):
      ax = axes[r, c]
      ax.imshow(frames[j, ..., 0], cmap="gray", vmin=0, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(f"frame {j + 1}", fontsize=8)
      if c == 0:
        ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
  fig.tight_layout()
  path = os.path.join(out_dir, "eval_samples.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
