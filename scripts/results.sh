#!/usr/bin/env bash
# Results of issue 7: train the all-softmax teacher, ARL2-75%, ARL2-100% and the token-read
# ablation (short CPU runs, the same wall-clock budget each), then evaluate them side by side on
# 10x-longer continuations of moving_digits test clips, with the write-during-denoising ablation
# as a sampling-time switch on the ARL2-75% checkpoint. About 20-25 minutes on 2 CPU cores.
#
#   scripts/results.sh [OUT]          # default OUT=runs/results
#
# Knobs (environment): TRAIN_MINUTES (4 per model), BATCH (8), EVAL_VIDEOS (16),
# WITH_BENCHMARK=1 (also run --mode=benchmark at the paper's horizon, ~5 more minutes),
# DOCS (docs/results: where the plots and JSON are copied; empty = do not copy),
# PYTHON (.venv/bin/python).
# Models use configs/default.py's training settings (learning rate, EMA, sampler); OpenBLAS is
# kept to one thread (docs/results.md: it competes with XLA's threads on a 2-core machine).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-runs/results}
PY=${PYTHON:-.venv/bin/python}
MINUTES=${TRAIN_MINUTES:-4}
BATCH=${BATCH:-8}
VIDEOS=${EVAL_VIDEOS:-16}
DOCS=${DOCS-docs/results}
export OPENBLAS_NUM_THREADS=1

COMMON=(--config.data.dir="$OUT/tfds" --config.progress=false)
# num_steps ~ what 2 cores manage in MINUTES (~6.5 steps/s for ARL2-75%), so the cosine decay
# completes; the time bound stops slower models (softmax, hybrid100) first.
STEPS=${TRAIN_STEPS:-$(python3 -c "print(int(float('$MINUTES') * 60 * 6.2))")}
TRAIN=("${COMMON[@]}" --config.train.max_minutes="$MINUTES" --config.train.num_steps="$STEPS"
       --config.train.batch_size="$BATCH" --config.train.checkpoint_every=100000
       --config.train.final_sample=False)

train() {  # name variant [extra flags...]
  local name=$1 variant=$2
  shift 2
  echo "== train $name ($variant $*) for $MINUTES min"
  "$PY" main.py --mode=train --config="configs/default.py:$variant" --workdir="$OUT/$name" \
    "${TRAIN[@]}" "$@"
}

start=$(date +%s)
train softmax softmax
train arl2_75 arl2
train arl2_100 hybrid100
train arl2_75_token_read arl2 --config.model.memory.read=token

echo "== eval"
"$PY" main.py --mode=eval --workdir="$OUT" "${COMMON[@]}" \
  --config.eval.num_videos="$VIDEOS" --config.eval.batch_size="$VIDEOS" \
  --config.eval.workdirs="softmax=$OUT/softmax,arl2_75=$OUT/arl2_75,arl2_100=$OUT/arl2_100,\
arl2_75_write_during_denoising=$OUT/arl2_75+memory.write_during_denoising=true,\
arl2_75_token_read=$OUT/arl2_75_token_read" | tee "$OUT/eval_table.txt"

if [[ "${WITH_BENCHMARK:-0}" == 1 ]]; then
  echo "== benchmark"
  "$PY" main.py --mode=benchmark --config=configs/benchmark.py --workdir="$OUT" --config.progress=false \
    | tee "$OUT/benchmark_table.txt"
fi

if [[ -n "$DOCS" ]]; then
  mkdir -p "$DOCS"
  cp "$OUT"/eval/eval_curves.png "$OUT"/eval/eval_samples.png "$OUT"/eval/eval.json \
     "$OUT"/eval_table.txt "$DOCS"/
  if [[ -d "$OUT/benchmark" ]]; then
    cp "$OUT"/benchmark/*.png "$OUT"/benchmark/benchmark.json "$DOCS"/
  fi
fi
echo "== done in $(( $(date +%s) - start )) s; outputs in $OUT${DOCS:+, copies in $DOCS}"
