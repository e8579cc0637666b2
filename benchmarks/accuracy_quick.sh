#!/usr/bin/env bash
# Time-boxed accuracy run for a short GPU lease: train (SIGTERM after TRAIN_S seconds saves a
# checkpoint), then evaluate the newest adapter on the full test split (EVAL_S=0 skips it). Logs, the
# metrics and the adapter (adapter.tgz) go to $OUT if set.
TRAIN_S=${TRAIN_S:-300}
EVAL_S=${EVAL_S:-200}
EPOCHS=${EPOCHS:-1}
LR=${LR:-1e-3}
BATCH=${BATCH:-16}
TARGETS=${TARGETS:-q_proj,v_proj}
PROMPT=${PROMPT:-simple}
RUN=${RUN:-outputs/acc-quick}
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
# shellcheck source=benchmarks/lib.sh
. benchmarks/lib.sh
export QLORANER_IN_CONTAINER=1 QLORANER_CACHE=${QLORANER_CACHE:-/root/qcache}
log=${OUT:-/tmp}/accuracy.log
timeout -s TERM "$TRAIN_S" ./run_train.sh --epochs "$EPOCHS" --lr "$LR" --batch-size "$BATCH" --output-dir "$RUN" \
  --target-modules "$TARGETS" --prompt "$PROMPT" \
  --save-every 100 --log-every 20 --no-eval --no-gradient-checkpointing 2>&1 | grep -vE "Loading|it/s\]" | tee "$log"
ckpt=$(newest_adapter "$RUN")
[ -n "${OUT:-}" ] && python3 benchmarks/train_curve.py "$RUN" > "$OUT/train_metrics.json"
[ -n "${OUT:-}" ] && tar czf "$OUT/adapter.tgz" -C "$(dirname "$ckpt")" "$(basename "$ckpt")"
[ "$EVAL_S" = 0 ] && exit 0
echo "evaluating $ckpt" | tee -a "$log"
timeout -s TERM "$EVAL_S" ./run_eval.sh --adapter "$ckpt" --batch-size 1024 --output-dir "$RUN/eval" 2>&1 | grep -vE "Loading" | tee -a "$log"
if [ -n "${OUT:-}" ]; then
  cp "$RUN"/eval/metrics.json "$OUT"/ 2>/dev/null
  gzip -c "$RUN"/eval/responses.jsonl > "$OUT"/responses.jsonl.gz 2>/dev/null
fi
