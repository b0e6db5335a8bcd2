"""How well a trained Moving-Digits checkpoint draws each label: many videos at once, scored with
the main job's digit figures (data/digit_metrics.py), per label and per frame range.

The main job's label figure is measured on one video, whose label its seed picks, and moves by
about 15 points between runs; this one streams `--per_label` videos of every label in one batch
(the same sampler and guidance as --mode=sample) and reports the label recognised per label and
per frame range, so a recipe change can be judged on 10 x per_label videos, and a figure that is
already low in the first frames (the digit is drawn wrong) can be told from one that falls later
(the digit drifts).

  python scripts/label_rates.py --workdir=runs/default                 # 8 frames, 5 per label
  python scripts/label_rates.py --workdir=runs/default --frames=64 --per_label=3 --guidance=4
  python scripts/label_rates.py --workdir=runs/default --label_use     # no sampling, seconds

--label_use asks whether the model uses its label at all: the first chunk of 64 training clips
is noised to fixed levels t and denoised once with each clip's label and once with the null
label; it prints the x0 error of each and the label's share of it ("gain"). A model that ignores
its label has gain ~0 at every t, and classifier-free guidance then has little to amplify.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Frame ranges reported (the first chunk of 2 frames, the rest of a training clip, then longer).
RANGES = ((0, 2), (2, 8), (8, 16), (16, 32), (32, 64), (64, None))
# Noise levels --label_use reports.
LABEL_USE_LEVELS = (0.5, 0.7, 0.8, 0.9)


def score(videos01: np.ndarray, labels: np.ndarray, classifier) -> dict:
  """Digit figures of videos [B, T, H, W] in [0, 1], each conditioned on labels[b]:
  label_rate (all frames), per_label (label -> rate), per_range ("a-b" -> rate), and the mean
  single_digit_rate and steady_rate (digit_metrics.video_digit_report)."""
  from data import digit_metrics  # pylint: disable=g-import-not-at-top
  videos01 = np.asarray(videos01, np.float32)
  labels = np.asarray(labels).reshape(-1)
  if videos01.ndim != 4 or len(videos01) != len(labels):
    raise ValueError(f"need videos [B, T, H, W] and B labels, got {videos01.shape} and "
                     f"{labels.shape}")
  hits = np.zeros(videos01.shape[:2], bool)
  one, steady = [], []
  for b, (video, label) in enumerate(zip(videos01, labels)):
    r = digit_metrics.video_digit_report(video, int(label), classifier)
    hits[b] = np.asarray(r["predicted"]) == int(label)
    one.append(r["single_digit_rate"])
    steady.append(r["steady_rate"])
  frames = videos01.shape[1]
  per_range = {}
  for start, stop in RANGES:
    stop = frames if stop is None else min(stop, frames)
    if start < stop:
      per_range[f"{start}-{stop}"] = float(hits[:, start:stop].mean())
  return {"videos": int(len(labels)), "frames": int(frames),
          "label_rate": float(hits.mean()),
          "per_label": {int(c): float(hits[labels == c].mean()) for c in np.unique(labels)},
          "per_range": per_range,
          "single_digit_rate": float(np.mean(one)), "steady_rate": float(np.mean(steady))}


def label_use(model, video, labels, levels=LABEL_USE_LEVELS, seed: int = 0) -> dict:
  """The x0 error of the first chunk of clips video [B, T, H, W, C] in [-1, 1] (later chunks
  clean context, as in training), denoised once at each level t with labels [B] and once with
  the model's null label: {t: {"label": mse, "null": mse, "gain": 1 - label / null}}."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from hybrid_video.diffusion import add_noise  # pylint: disable=g-import-not-at-top
  if model.null_label_index is None:
    raise ValueError("label_use needs a model with a null label (model.null_label)")
  video = jnp.asarray(video, jnp.float32)
  b, frames = video.shape[:2]
  f = model.frames_per_chunk
  eps = jax.random.normal(jax.random.PRNGKey(seed), video.shape)
  conds = {"label": jnp.asarray(labels, jnp.int32).reshape(b, 1),
           "null": jnp.full((b, 1), model.null_label_index, jnp.int32)}
  out = {}
  for level in levels:
    t = jnp.zeros((b, frames // f), jnp.float32).at[:, 0].set(level)
    x_t = add_noise(video, eps, jnp.repeat(t, f, axis=1))
    mse = {}
    for name, cond in conds.items():
      v = model.teacher_forcing(video, x_t, t, cond).astype(jnp.float32)
      x0 = x_t[:, :f] - level * v[:, :f]
      mse[name] = float(jnp.mean(jnp.square(x0 - video[:, :f])))
    out[float(level)] = {**mse, "gain": 1.0 - mse["label"] / mse["null"]}
  return out


def training_clips(config, count: int):
  """The first `count` training clips of a Moving-Digits config: (video [B, T, H, W, 1] in
  [-1, 1], labels [B])."""
  from data import pipeline  # pylint: disable=g-import-not-at-top
  from hybrid_video import inputs as inputs_lib  # pylint: disable=g-import-not-at-top
  source = inputs_lib.make_split_source(config, "train")
  raw = {k: np.stack([np.asarray(source[i][k]) for i in range(min(count, len(source)))])
         for k in ("video", "labels")}
  batch = pipeline.to_model_inputs(raw)
  return batch["video"], np.asarray(batch["labels"]).reshape(-1)


def generate(workdir: str, *, frames: int, per_label: int, guidance: float | None,
             seed: int, step: int | None = None):
  """(videos [10 * per_label, frames, H, W] in [0, 1], labels, config, checkpoint step): the
  checkpoint's EMA model streams per_label videos of every label in one batch."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from hybrid_video import inputs as inputs_lib  # pylint: disable=g-import-not-at-top
  from hybrid_video.restore import load_model  # pylint: disable=g-import-not-at-top
  from hybrid_video.streaming import StreamingSampler  # pylint: disable=g-import-not-at-top
  from hybrid_video.video_io import to_unit  # pylint: disable=g-import-not-at-top
  model, config, step = load_model(default.get_config(), workdir, step)
  if config.model.cond != "labels" or config.data.source != "moving_digits":
    raise SystemExit(f"label_rates: {workdir} is not a label-conditioned Moving-Digits model "
                     f"(model.cond={config.model.cond!r}, data.source={config.data.source!r})")
  if guidance is not None:
    config.sampler.guidance = float(guidance)
  labels = np.tile(np.arange(int(config.model.num_classes)), per_label).astype(np.int32)
  sampler = StreamingSampler(model, config.sampler, batch=len(labels),
                             frame_hw=inputs_lib.frame_hw(config))
  chunks = []
  sampler.stream(frames, jnp.asarray(labels[:, None]), seed=seed, progress=False,
                 on_frames=lambda f: chunks.append(np.asarray(f)))
  videos = to_unit(np.concatenate(chunks, axis=1)[..., 0])
  return videos, labels, config, step


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a --mode=train workdir (its latest checkpoint)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--frames", type=int, default=8, help="frames per video (default 8)")
  p.add_argument("--per_label", type=int, default=5, help="videos per label (default 5)")
  p.add_argument("--guidance", type=float, default=None,
                 help="classifier-free guidance (default: the checkpoint config's sampler)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
  p.add_argument("--json", default=None, help="also write the figures to this file")
  p.add_argument("--label_use", action="store_true",
                 help="instead of sampling: the first chunk's x0 error with and without the "
                      "label at fixed noise levels (does the model use its label?)")
  args = p.parse_args(argv)
  if args.frames < 1 or args.per_label < 1:
    raise SystemExit("label_rates: --frames and --per_label must be >= 1")
  if not os.path.isdir(args.workdir):
    raise SystemExit(f"label_rates: --workdir={args.workdir} is not a directory")
  from data import digit_metrics, moving_digits  # pylint: disable=g-import-not-at-top
  from hybrid_video.errors import UserError  # pylint: disable=g-import-not-at-top
  if args.label_use:
    return _main_label_use(args)
  try:
    videos, labels, config, step = generate(args.workdir, frames=args.frames,
                                            per_label=args.per_label, guidance=args.guidance,
                                            seed=args.seed, step=args.step)
  except UserError as e:
    raise SystemExit(f"label_rates: {e}") from None
  dcfg = moving_digits.get_config(config.data.config)
  result = score(videos, labels, digit_metrics.digit_classifier(dcfg.digit_size,
                                                                dcfg.interpolation))
  result.update({"workdir": args.workdir, "step": step, "seed": args.seed,
                 "guidance": float(config.sampler.guidance)})
  print(f"{args.workdir} step {step}: {result['videos']} videos x {result['frames']} frames, "
        f"guidance {result['guidance']:g}")
  print(f"  label recognised {result['label_rate']:.0%}  one digit "
        f"{result['single_digit_rate']:.0%}  steady {result['steady_rate']:.0%}")
  print("  per label  " + "  ".join(f"{c}:{r:.0%}" for c, r in result["per_label"].items()))
  print("  per frames " + "  ".join(f"{k}:{r:.0%}" for k, r in result["per_range"].items()))
  _write_json(result, args.json)
  return result


def _write_json(result: dict, path: str | None) -> None:
  if path:
    with open(path, "w") as f:
      json.dump(result, f, indent=1)


def _main_label_use(args) -> dict:
  from configs import default  # pylint: disable=g-import-not-at-top
  from hybrid_video.errors import UserError  # pylint: disable=g-import-not-at-top
  from hybrid_video.restore import load_model  # pylint: disable=g-import-not-at-top
  try:
    model, config, step = load_model(default.get_config(), args.workdir, args.step)
    if config.model.cond != "labels" or config.data.source != "moving_digits":
      raise UserError(f"{args.workdir} is not a label-conditioned Moving-Digits model")
    video, labels = training_clips(config, 64)
    use = label_use(model, video, labels, seed=args.seed)
  except (UserError, ValueError) as e:
    raise SystemExit(f"label_rates: {e}") from None
  print(f"{args.workdir} step {step}: first-chunk x0 error of {len(labels)} training clips, "
        "with each clip's label / the null label")
  for level, r in use.items():
    print(f"  t={level:g}  label {r['label']:.4f}  null {r['null']:.4f}  gain {r['gain']:+.1%}")
  result = {"workdir": args.workdir, "step": step, "label_use": use}
  _write_json(result, args.json)
  return result


if __name__ == "__main__":
  main()
