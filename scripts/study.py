"""The small-scale study (issue 19): a softmax teacher, ARL2 converted from it, the sink + window
baseline and both ablations, evaluated on held-out digits at 1x, 4x and 10x the training clip,
on the plain data and on the memory task, over several seeds.

  python scripts/study.py --root=runs/study                      # every piece not yet done
  python scripts/study.py --root=runs/study --data=slow --only=teacher   # one piece
  python scripts/study.py --root=runs/study --summary            # tables from what has run

Runnable in pieces and across sittings: each piece is one main.py process whose outputs say it
is done (a teacher checkpoint at --teacher_steps, a student's summary.json, an eval.json), and
training resumes from its checkpoints, so a killed run loses at most the last
checkpoint_every steps. The wall time each model trained, over all sittings, is kept in
<model>/study_seconds.json. Any extra --config.* flags after `--` go to every main.py call (for
example a GPU run's larger batch).

Per data config (`--data`, comma-separated):
  slow   the plain task (moving_digits/slow: 8-frame clips, one digit on the 32x32 canvas)
  exits  the memory task (moving_digits/exits: the digit leaves the canvas sideways for 3-6
         chunks and comes back; 40-frame clips)
the models are
  teacher              all-softmax (configs/default.py:softmax with the main job's recipe),
                       trained for a fixed number of steps (not a time bound: load on the
                       machine changes the wall time, not the model)
  arl2_75, arl2_100    converted from the teacher (configs/convert.py: stage 1 alignment,
                       stage 2 distillation with LoRA), 75% and 100% hybrid layers
  arl2_75_token_read   converted with memory.read=token (ablation: per-token read)
and the evaluation (--mode=eval, eval.num_seeds seeds, the same noise for every model) adds
  sink_window          the teacher sampled with 1 sink chunk + a window of W chunks, W chosen
                       so its K/V carry equals ARL2-75%'s carry at the end of the evaluated
                       stream (`window_for_equal_carry`)
  window               (exits only) the same carry as a plain sliding window, no sink
  arl2_75_write_during_denoising   arl2_75 sampled with the ablation switch on
Plain data is scored with each clip's label for 10 training clips (buckets at 1x, 4x, 10x);
the memory task with the null label (the digit's identity has to come from the context
frames), for --exits_frames generated frames, with identity after the gap. Results:
<root>/<data>/eval/eval.json and plots; --summary writes <root>/study.md and study.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ml_collections  # pylint: disable=wrong-import-position

from configs import default as default_config  # pylint: disable=wrong-import-position
from data import moving_digits  # pylint: disable=wrong-import-position
from hybrid_video import checkpoint as ckpt_lib  # pylint: disable=wrong-import-position
from hybrid_video.modes.evaluate import CONDITION_WORDS  # pylint: disable=wrong-import-position
from hybrid_video.nn.model import resolve_hybrid_layers  # pylint: disable=wrong-import-position

DATA = ("slow", "exits")
STUDENTS = {  # name -> extra --config.* flags of --mode=convert
    "arl2_75": ["--config.convert.hybrid.ratio=0.75"],
    "arl2_100": ["--config.convert.hybrid.ratio=1.0"],
    "arl2_75_token_read": ["--config.convert.hybrid.ratio=0.75",
                           "--config.convert.memory_read=token"],
}
PIECES = ("teacher", *STUDENTS, "eval")
# Teacher targets of the issue (plain data, frames 1-8 and 33-80 of the 10x continuation).
TARGETS = {"retention_1x": 0.8, "retention_10x": 0.6, "position_error_1x": 2.0}


def window_for_equal_carry(*, num_layers: int, softmax_layers: int, chunks: int,
                           tokens_per_chunk: int, dim: int, head_dim: int,
                           sink_chunks: int) -> int:
  """Window W (chunks) of an all-softmax model with `sink_chunks` sinks whose K/V carry is
  closest to an ARL2 model's after `chunks` chunks: `softmax_layers` layers keeping every
  chunk's K/V plus (num_layers - softmax_layers) fp32 states of dim x head_dim each. Both
  models keep K/V in the same dtype, so bytes per chunk per layer cancel out."""
  kv = 2 * tokens_per_chunk * dim                      # K and V of one chunk in one layer
  arl2 = softmax_layers * chunks * kv + (num_layers - softmax_layers) * dim * head_dim
  return max(1, round(arl2 / (num_layers * kv)) - sink_chunks)


class Study:
  def __init__(self, args, extra):
    self.args, self.extra = args, extra
    self.python = args.python or sys.executable

  def path(self, data, *parts):
    return os.path.join(self.args.root, data, *parts)

  def common(self, data):
    return [f"--config.data.config={data}",
            f"--config.data.dir={os.path.join(self.args.root, 'tfds')}",
            "--config.progress=false"]

  def run(self, name, cmd, timed_dir=None):
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    if self.args.dry_run:
      return
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT)
    if timed_dir is not None:  # accumulate this model's training time over sittings
      os.makedirs(timed_dir, exist_ok=True)
      path = os.path.join(timed_dir, "study_seconds.json")
      seconds = _read_json(path, {"seconds": 0.0, "sittings": 0})
      seconds["seconds"] += time.time() - t0
      seconds["sittings"] += 1
      with open(path, "w") as f:
        json.dump(seconds, f)
    if r.returncode:
      raise SystemExit(f"error: {name} failed (exit {r.returncode}); rerun to resume")

  # -- pieces --------------------------------------------------------------------------------------

  def teacher(self, data):
    workdir = self.path(data, "teacher")
    steps = self.args.teacher_steps if data == "slow" else self.args.exits_teacher_steps
    if os.path.isdir(os.path.join(workdir, "checkpoints", str(steps))):
      print(f"== {data}/teacher: done ({steps} steps)")
      return
    batch = [] if data == "slow" else [f"--config.train.batch_size={self.args.exits_batch}"]
    self.run(f"{data}/teacher", [
        self.python, "main.py", "--mode=train", "--config=configs/default.py:softmax",
        f"--workdir={workdir}", *self.common(data), f"--config.train.num_steps={steps}",
        "--config.train.max_minutes=0", "--config.train.checkpoint_every=250",
        "--config.train.final_sample=False", *batch, *self.extra], timed_dir=workdir)

  def student(self, data, name):
    workdir = self.path(data, name)
    if os.path.exists(os.path.join(workdir, "summary.json")):
      print(f"== {data}/{name}: done")
      return
    if not self.args.dry_run and not os.path.isdir(self.path(data, "teacher", "checkpoints")):
      raise SystemExit(f"error: {data}/{name} needs the teacher: run --only=teacher first")
    a = self.args
    batch = [] if data == "slow" else [f"--config.convert.stage1.batch_size={a.exits_batch}",
                                        f"--config.convert.stage2.batch_size={a.exits_batch}"]
    self.run(f"{data}/{name}", [
        self.python, "main.py", "--mode=convert", "--config=configs/convert.py",
        f"--config.convert.teacher_workdir={self.path(data, 'teacher')}",
        f"--workdir={workdir}", *self.common(data),
        f"--config.convert.stage1.num_steps={a.stage1_steps}",
        f"--config.convert.stage2.num_steps={a.stage2_steps}",
        "--config.convert.stage1.max_minutes=0", "--config.convert.stage2.max_minutes=0",
        "--config.convert.sample_frames=0", "--config.convert.eval.num_clips=0",  # eval: below
        *batch, *STUDENTS[name], *self.extra],
        timed_dir=workdir)

  def teacher_model(self, data):
    """The teacher's model config as its checkpoint saved it (so extra --config.model.* flags
    count), or configs/default.py's for a dry run before the teacher exists."""
    workdir = self.path(data, "teacher")
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
      return default_config.model_config()
    ck = ckpt_lib.Checkpointer(workdir)
    try:
      return ml_collections.ConfigDict(ck.saved_config(ck.latest_step())["model"])
    finally:
      ck.close()

  def eval_plan(self, data) -> tuple[list[str], list[str]]:
    """(--config.eval.workdirs entries, eval flags) of one data config."""
    m = self.teacher_model(data)
    dcfg = moving_digits.get_config(data)
    clip = int(dcfg.num_frames)
    context = self.args.context_frames
    generated = 10 * clip if data == "slow" else self.args.exits_frames
    pt, ph, pw = m.patch_size
    f = m.frames_per_chunk
    chunks = -(-(context + generated) // f)
    tokens = f // pt * (dcfg.canvas_size // ph) * (dcfg.canvas_size // pw)
    teacher = self.path(data, "teacher")
    hybrid = resolve_hybrid_layers(m.num_layers, None, 0.75)  # ARL2-75%, as converted
    sizes = dict(num_layers=m.num_layers, softmax_layers=m.num_layers - len(hybrid),
                 chunks=chunks, tokens_per_chunk=tokens, dim=m.dim,
                 head_dim=m.dim // m.num_heads)
    w1 = window_for_equal_carry(sink_chunks=1, **sizes)
    w0 = window_for_equal_carry(sink_chunks=0, **sizes)
    entries = [f"teacher={teacher}",
               f"sink_window={teacher}+kv_cache.sink_chunks=1+kv_cache.window_chunks={w1}"]
    if data == "exits":
      entries.append(f"window={teacher}+kv_cache.sink_chunks=0+kv_cache.window_chunks={w0}")
    for name in STUDENTS:
      entries.append(f"{name}={self.path(data, name)}")
    entries.append(f"arl2_75_write_during_denoising={self.path(data, 'arl2_75')}"
                   "+memory.write_during_denoising=true")
    flags = [f"--config.eval.context_frames={context}", f"--config.eval.num_frames={generated}",
             f"--config.eval.num_videos={self.args.eval_videos}",
             f"--config.eval.batch_size={self.args.eval_videos}",
             f"--config.eval.num_seeds={self.args.seeds}",
             f"--config.eval.condition={'label' if data == 'slow' else 'null'}",
             "--config.eval.bucket_clips=(1, 4, 10)" if data == "slow"
             else "--config.eval.bucket_clips=(1,)"]
    if data == "exits":  # guided by the null label = unguided; one model pass instead of two
      flags.append("--config.sampler.guidance=1.0")
    return entries, flags

  def evaluate(self, data):
    out = self.path(data)
    if os.path.exists(os.path.join(out, "eval", "eval.json")) and not self.args.force_eval:
      print(f"== {data}/eval: done (--force_eval reruns it)")
      return
    entries, flags = self.eval_plan(data)
    missing = [e for e in entries if not self.args.dry_run and not os.path.isdir(
        e.split("=", 1)[1].split("+")[0])]
    if missing:
      raise SystemExit(f"error: {data}/eval needs every model first; missing: {missing}")
    self.run(f"{data}/eval", [self.python, "main.py", "--mode=eval", f"--workdir={out}",
                              *self.common(data), *flags,
                              f"--config.eval.workdirs={','.join(entries)}", *self.extra])


# -- summary ---------------------------------------------------------------------------------------


def _read_json(path, default=None):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return default


def _cell(e, key, bucket=None, digits=3):
  if bucket is None:
    value = (e.get("gap") or {}).get(key)
    spread = ((e.get("spread") or {}).get("gap") or {}).get(key)
  else:
    value = e["buckets"][bucket][key] if bucket < len(e["buckets"]) else None
    spread = (e.get("spread") or {}).get("buckets")
    spread = spread[bucket][key] if spread and bucket < len(spread) else None
  if value is None:
    return "-"
  return f"{value:.{digits}f}" + ("" if spread is None else f" ± {spread:.{digits}f}")


def trained_seconds(workdir) -> float | None:
  """A student's stage 1 + stage 2 training seconds (its summary.json); else the wall time of
  the model's main.py calls over all sittings (study_seconds.json)."""
  summary = _read_json(os.path.join(workdir, "summary.json"))
  if summary and "stage1" in summary and "stage2" in summary:
    return summary["stage1"]["seconds"] + summary["stage2"]["seconds"]
  s = _read_json(os.path.join(workdir, "study_seconds.json"))
  return None if s is None else s["seconds"]


def summarize(root) -> dict:
  """study.md (markdown tables) and study.json from the eval.json files under root."""
  lines, out = [], {}
  for data in DATA:
    res = _read_json(os.path.join(root, data, "eval", "eval.json"))
    if res is None:
      continue
    out[data] = res
    buckets = [tuple(b) for b in res["buckets"]]
    head = ["model", "trained"]
    cols = []
    for i, (a, b) in enumerate(buckets):
      span = f"{a + 1}-{b}"
      cols += [("psnr", i, 2, f"PSNR {span}"), ("ssim", i, 3, f"SSIM {span}"),
               ("retention", i, 3, f"retention {span}"),
               ("position_error", i, 2, f"pos err px {span}")]
    if data == "exits":
      cols.append(("identity_after_gap", None, 3, "identity after gap"))
    head += [c[3] for c in cols]
    lines += [f"## {data}: {res['num_videos']} test clips, {res['context_frames']} context "
              f"frames, {res['num_frames']} generated, conditioned on "
              f"{CONDITION_WORDS[res['condition']]}, "
              f"{len(res['seeds'])} seed(s) (mean ± std)", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [(f"{k} (baseline)", e, None) for k, e in res["baselines"].items()]
    rows += [(k, e, e["workdir"]) for k, e in res["entries"].items()]
    for label, e, workdir in rows:
      secs = trained_seconds(workdir) if workdir else None
      trained = "-" if secs is None else f"{secs / 60:.0f} min"
      if e.get("overrides"):
        trained = "(sampling switch)"
      lines.append("| " + " | ".join(
          [label, trained] + [_cell(e, key, i, d) for key, i, d, _ in cols]) + " |")
    teacher = res["entries"].get("teacher")
    if data == "slow" and teacher and len(buckets) >= 3:
      got = {"retention_1x": teacher["buckets"][0]["retention"],
             "retention_10x": teacher["buckets"][-1]["retention"],
             "position_error_1x": teacher["buckets"][0]["position_error"]}
      met = {k: (v is not None and (v <= TARGETS[k] if "error" in k else v >= TARGETS[k]))
             for k, v in got.items()}
      out["teacher_targets"] = {"targets": TARGETS, "measured": got, "met": met}
      lines += ["", "Teacher targets: " + "; ".join(
          f"{k} {got[k]:.3f} (target {'<=' if 'error' in k else '>='} {TARGETS[k]}: "
          f"{'met' if met[k] else 'not met'})" for k in got)]
    lines.append("")
  text = "\n".join(lines)
  with open(os.path.join(root, "study.md"), "w") as f:
    f.write(text)
  with open(os.path.join(root, "study.json"), "w") as f:
    json.dump(out, f, indent=1)
  return {"markdown": text, **out}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--root", required=True, help="where the study's workdirs go")
  p.add_argument("--data", default=",".join(DATA), help=f"comma-separated, of {DATA}")
  p.add_argument("--only", default=",".join(PIECES), help=f"comma-separated, of {PIECES}")
  p.add_argument("--teacher_steps", type=int, default=3000, help="plain-data teacher steps")
  p.add_argument("--exits_teacher_steps", type=int, default=600)
  p.add_argument("--exits_batch", type=int, default=4, help="clips per step on exits (40 frames)")
  p.add_argument("--stage1_steps", type=int, default=200)
  p.add_argument("--stage2_steps", type=int, default=200)
  p.add_argument("--context_frames", type=int, default=4)
  p.add_argument("--exits_frames", type=int, default=40, help="generated frames on exits")
  p.add_argument("--eval_videos", type=int, default=16)
  p.add_argument("--seeds", type=int, default=2)
  p.add_argument("--force_eval", action="store_true", help="rerun evaluations already done")
  p.add_argument("--summary", action="store_true", help="only write study.md / study.json")
  p.add_argument("--dry_run", action="store_true", help="print the commands only")
  p.add_argument("--python", default=None, help="interpreter of the main.py calls")
  args, extra = p.parse_known_args(argv)
  extra = [e for e in extra if e != "--"]
  bad = [e for e in extra if not e.startswith("--config.")]
  if bad:
    raise SystemExit(f"error: unknown arguments {bad} (extra flags must be --config.*)")
  datas = [d for d in args.data.split(",") if d]
  pieces = [x for x in args.only.split(",") if x]
  unknown = sorted(set(datas) - set(DATA)) + sorted(set(pieces) - set(PIECES))
  if unknown:
    raise SystemExit(f"error: unknown --data/--only values {unknown}; choose from {DATA} and "
                     f"{PIECES}")
  if not args.summary:
    study = Study(args, extra)
    for data in datas:
      for piece in PIECES:
        if piece not in pieces:
          continue
        if piece == "teacher":
          study.teacher(data)
        elif piece == "eval":
          study.evaluate(data)
        else:
          study.student(data, piece)
  if not args.dry_run:
    print(summarize(args.root)["markdown"])


if __name__ == "__main__":
  main()
