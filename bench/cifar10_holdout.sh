#!/usr/bin/env bash
# CIFAR-10 accuracy measured on images no choice was made on (issue 21): 10,000 of the
# 50,000 training images are set aside (a seeded, stratified split of symbolic links),
# each model's default search runs on the other 40,000 (32,000 training / 8,000
# validation), the chosen configuration is refit on all 40,000, and that model is
# tested on the 10,000.  Results: bench/results/cifar10-holdout/<model>.json (+ PNGs).
#
#   bash bench/cifar10_holdout.sh [svm softmax twolayer]      (~1 + 1 + 25 min on 2 cores)
#
# DATA (default ../shared/data/cifar10-train) is the image folder; SPLIT the folder that
# gets train/ and test/ (default $TMPDIR/linclass-cifar10-split).  EXTRA: more `linclass
# train` arguments, SUFFIX: added to the result names; the raw-pixel linear models are
#   EXTRA="--features pixels" SUFFIX=-pixels bash bench/cifar10_holdout.sh svm softmax
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data/cifar10-train}
SPLIT=${SPLIT:-${TMPDIR:-/tmp}/linclass-cifar10-split}
OUT=bench/results/cifar10-holdout
models=${*:-svm softmax twolayer}
mkdir -p "$OUT"
$PY -m linclass split "$DATA" "$SPLIT" --test 10000 --seed 0
for model in $models; do
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} $PY -m linclass train --model "$model" --dataset folder \
        --train-dir "$SPLIT/train" --test-dir "$SPLIT/test" --search --quiet \
        ${EXTRA:-} --out "$OUT/$model${SUFFIX:-}" --json "$OUT/$model${SUFFIX:-}.json"
    rm -f "$OUT/$model${SUFFIX:-}/model.pt"  # the checkpoint is not kept in the repository
done
