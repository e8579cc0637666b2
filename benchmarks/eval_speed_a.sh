#!/usr/bin/env bash
# Evaluation speed (a) with a fresh fine-tune, in one call on one GPU, after the bundle's two-step start:
#   . /root/qdev/env.sh && bash benchmarks/eval_speed_a.sh
# 1. accuracy_quick.sh trains SmolLM2 (TARGETS, BATCH, EPOCHS; time box TRAIN_S; train_metrics.json to $OUT).
# 2. bench_eval.py part (a) on that adapter: ours over the full test split, then the original's pipeline over
#    PEER_SENTENCES sentences in chunks (time box EVAL_S; bench_eval_a.json to $OUT after each figure).
TRAIN_S=${TRAIN_S:-320}
EVAL_S=${EVAL_S:-250}
export TARGETS=${TARGETS:-all-linear} BATCH=${BATCH:-32} EPOCHS=${EPOCHS:-1.2} RUN=${RUN:-outputs/speed-a}
export PEER_SENTENCES=${PEER_SENTENCES:-200}
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
# shellcheck source=benchmarks/lib.sh
. benchmarks/lib.sh
export QLORANER_IN_CONTAINER=1 QLORANER_CACHE=${QLORANER_CACHE:-/root/qcache} PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp}
TRAIN_S=$TRAIN_S EVAL_S=0 bash benchmarks/accuracy_quick.sh | tail -n 5
adapter=$(newest_adapter "$RUN")
echo "adapter: $adapter"
ADAPTER=$adapter PART_B=0 BENCH_JSON=bench_eval_a.json timeout "$EVAL_S" python3 benchmarks/bench_eval.py 2>&1 \
  | grep --line-buffered -vE "Loading|it/s\]|^\s*$" | tail -n 40
