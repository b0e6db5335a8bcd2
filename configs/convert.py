"""Converting a trained all-softmax model into an ARL2 hybrid (hybrid_video/conversion/; the
driver is hybrid_video/modes/convert.py).

The whole recipe on CPU (Moving Digits: teacher, stage 1, stage 2, merge, long video; about
9 minutes on 2 cores, every phase time-bounded):

  bash scripts/convert_recipe.sh runs/recipe

which runs these three commands (any --config.* field can be added to each):

  # 1. the teacher: configs/default.py:softmax, trained for at most 5 minutes
  python main.py --mode=train --config=configs/default.py:softmax --workdir=runs/recipe/teacher \
      --config.train.num_steps=2000 --config.train.max_minutes=5 \
      --config.train.checkpoint_every=1000 --config.train.final_sample=False
  # 2. conversion (its EMA weights): stage 1 (per-layer alignment), stage 2 (distillation +
  #    LoRA), LoRA merge and export, PSNR of teacher vs student on the test split (same noise),
  #    teacher and student videos
  python main.py --mode=convert --config=configs/convert.py \
      --config.convert.teacher_workdir=runs/recipe/teacher --workdir=runs/recipe/student
  # 3. the export is a plain ARL2 checkpoint: stream a long video from it
  python main.py --mode=sample --workdir=runs/recipe/student --num_frames=128

The student's model shapes come from the teacher checkpoint; `convert.hybrid` picks the hybrid
layers. Output: runs/recipe/student/{params.txt, summary.json, stage1/, stage2/ (checkpoints of
the trainable parameters, metrics with per-layer losses and diagnostics), checkpoints/ (the
export), samples/}. A finished stage is not trained again when the command is rerun.

Parameter counts only (nothing trained, no checkpoint needed), e.g. at Wan2.1-1.3B shapes:

  python main.py --mode=convert --config=configs/convert.py:wan1_3b --workdir=/tmp/table

Variants (`--config=configs/convert.py:VARIANT`):
  default   the CPU recipe on moving_digits, stage 2 by teacher forcing
  rollout   stage 2 on student rollouts (the student streams its own history)
  smoke     a few steps of everything on the tiny data (tests, quick checks)
  wan1_3b   the parameter table at Wan2.1-1.3B shapes (table_only)
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from configs import default


def stage_config(**overrides) -> ml_collections.ConfigDict:
  """Optimizer and loop settings of one stage (fields as in configs/default.py train)."""
  s = ml_collections.ConfigDict()
  s.num_steps = 200            # optimizer steps (the stage also stops at max_minutes)
  s.max_minutes = 0.0          # wall-clock bound, minutes; 0 = no bound
  s.batch_size = 8             # clips per step
  s.learning_rate = 3e-3       # peak AdamW learning rate
  s.warmup_steps = 20          # linear warmup steps
  s.end_lr_factor = 0.1        # cosine decay ends at learning_rate * end_lr_factor
  s.weight_decay = 0.0         # no decay: it would pull phi away from the identity
  s.grad_clip = 1.0            # global gradient-norm clip
  s.ema_decay = 0.0            # EMA of the trainable parameters, warmup as in training; 0 = off
  s.t_logit_mean = 0.0         # per-chunk noise level t = sigmoid(N(mean, std)), as in training
  s.t_logit_std = 1.0
  s.label_dropout = 0.0        # fraction of clips given the null label (teacher and student
  #                              alike; only teachers with model.null_label: classifier-free
  #                              guidance keeps working after conversion)
  s.log_every = 20             # steps between metric (and diagnostics) writes
  s.checkpoint_every = 1000    # steps between checkpoints (and one at the end)
  s.keep_checkpoints = 2       # checkpoints kept per stage
  for k, v in overrides.items():
    s[k] = v
  return s


def convert_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.teacher_workdir = placeholder(str)  # --workdir of the all-softmax teacher (--mode=train)
  c.teacher_step = placeholder(int)     # teacher checkpoint step; None = latest
  c.teacher_dtype = "float32"  # storage of the frozen teacher's matrices in the stages:
  #                              "bfloat16" halves them (computation stays in model.dtype)
  c.table_only = False         # print the parameter table of config.model and stop
  c.seed = 0                   # init seed of the new parameters (gates, LoRA A)
  c.hybrid = ml_collections.ConfigDict()
  c.hybrid.layers = placeholder(tuple)  # explicit hybrid layer indices; overrides ratio
  c.hybrid.ratio = 0.75        # fraction of layers made hybrid, earliest first
  c.memory_read = "block"      # the student's model.memory.read: "block" (ARL2) or "token"
  #                              (the per-token-read ablation, converted and distilled with it)
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 16             # LoRA rank in stage 2 (paper: 16)
  c.lora.alpha = 32.0          # LoRA alpha; the delta is scaled by alpha / rank (paper: 32)
  c.lora.mlp = True            # LoRA on the hybrid layers' MLP linears (merged at export)
  c.lora.memory = True         # LoRA on the memory branch's q, k, v (kept as a memory-only
  #                              low-rank delta at export: it cannot merge into the shared W_q)
  c.lora.init = "authors"      # A's init: "authors" (the ARL2 release: Kaiming-uniform on
  #                              [dim, rank], bound 1/sqrt(rank)) or "peft" (PEFT/torch Linear:
  #                              bound 1/sqrt(in_features), this project's earlier default);
  #                              B starts at zero in both
  c.stage1 = stage_config(num_steps=120, learning_rate=1e-2, max_minutes=2.5)  # alignment
  c.stage2 = stage_config(num_steps=100, learning_rate=1e-3, batch_size=4,     # distillation
                          max_minutes=3.0, label_dropout=0.1)  # as the teacher's training
  c.stage2.mode = "teacher_forcing"  # "teacher_forcing" (dataset clips) or "rollout"
  c.stage2.rollout = ml_collections.ConfigDict()
  c.stage2.rollout.num_chunks = 6     # chunks the student generates per rollout
  c.stage2.rollout.grad_chunks = 2    # last chunks with a loss and gradients (truncated BPTT)
  c.stage2.rollout.sink_chunks = 1    # the STUDENT's softmax K/V caches during rollouts: first
  c.stage2.rollout.window_chunks = 2  # chunks kept plus this many recent ones; 0 = unbounded
  #                                     (memory then grows with num_chunks)
  c.stage2.rollout.bound_teacher = False  # also bound the frozen teacher's caches so. Off by
  #                                     default: the teacher is the unchanged original (method
  #                                     doc §6). On, late chunks are matched to a windowed model
  #                                     that is not the original; it saves the teacher's K/V
  #                                     beyond sink + window chunks (num_chunks - 3 chunks here)
  c.eval = ml_collections.ConfigDict()
  c.eval.num_clips = 32        # test clips for the PSNR comparison; 0 = skip
  c.eval.context_frames = 4    # ground-truth frames written before generation starts
  c.eval.num_frames = 32       # clip length (moving_digits clips are regenerated to it)
  c.eval.seed = 0              # noise seed, shared by teacher and student
  c.sample_frames = 64         # teacher and student videos at the end; 0 = none
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config of variant `arg` (see module docstring)."""
  variant = arg or "default"
  c = default.get_config("softmax" if variant != "wan1_3b" else "wan1_3b")
  c.convert = convert_config()
  if variant == "default":
    pass
  elif variant == "rollout":
    c.convert.stage2.mode = "rollout"
    c.convert.stage2.batch_size = 4
  elif variant == "smoke":
    c.data.config = "tiny"
    for s in (c.convert.stage1, c.convert.stage2):
      s.num_steps, s.batch_size, s.log_every, s.warmup_steps = 4, 2, 2, 1
    c.convert.eval.num_clips = 2
    c.convert.eval.context_frames = 2
    c.convert.eval.num_frames = 8
    c.convert.sample_frames = 8
    c.sampler.kind = "few_step"
    c.sampler.timesteps = (1000, 500)
  elif variant == "wan1_3b":
    c.convert.table_only = True
  else:
    raise ValueError(f"unknown config variant {variant!r}; choose default, rollout, smoke, "
                     "wan1_3b")
  return c
