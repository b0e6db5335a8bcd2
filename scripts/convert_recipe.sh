#!/usr/bin/env bash
# The whole ARL2 conversion recipe on CPU (Moving Digits, about 9 minutes on 2 cores):
#   1. train a small all-softmax teacher,
#   2. convert it: stage 1 (per-layer alignment), stage 2 (distillation + LoRA), LoRA merge and
#      export, PSNR of teacher vs student on the test split, teacher and student videos,
#   3. stream a long video from the exported student with --mode=sample.
# Usage: bash scripts/convert_recipe.sh [RUN_DIR] [extra --config.* flags for the convert step]
# See configs/convert.py for every setting.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:-runs/convert_recipe}
shift || true
PY=${PYTHON:-.venv/bin/python}
# The teacher: configs/default.py:softmax (the main job's model with every layer softmax),
# trained for a bounded time.
TEACHER_FLAGS=(
  --config.train.num_steps=${TEACHER_STEPS:-2000} --config.train.max_minutes=${TEACHER_MINUTES:-5}
  --config.train.checkpoint_every=1000 --config.train.final_sample=False
)
time "$PY" main.py --mode=train --config=configs/default.py:softmax \
    --workdir="$RUN_DIR/teacher" "${TEACHER_FLAGS[@]}"
time "$PY" main.py --mode=convert --config=configs/convert.py \
    --config.convert.teacher_workdir="$RUN_DIR/teacher" --workdir="$RUN_DIR/student" "$@"
time "$PY" main.py --mode=sample --workdir="$RUN_DIR/student" --config.sampler.num_frames=128
