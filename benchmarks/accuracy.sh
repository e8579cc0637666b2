#!/usr/bin/env bash
# Accuracy: QLoRA fine-tune the embedded default (SmolLM2-135M-Instruct, NF4 double quant) on the
# full CoNLL-2003 train split, then evaluate base and fine-tuned on the full test split.
# On the GPU machine, after the bundle's two-step start:  . /root/qdev/env.sh && bash benchmarks/accuracy.sh
# Settings (environment variables override):
PROMPT=${PROMPT:-simple}
EPOCHS=${EPOCHS:-2}
LR=${LR:-1e-3}
TARGETS=${TARGETS:-q_proj,v_proj}
LORA_R=${LORA_R:-64}
LORA_ALPHA=${LORA_ALPHA:-16}
BATCH=${BATCH:-16}
EVAL_BATCH=${EVAL_BATCH:-1024}  # SmolLM2: 2.3x batch 256 on an H200 (RESULTS.md 3 (a))
COMPARE_BASE=${COMPARE_BASE:-1}
RUN=${RUN:-outputs/accuracy-$PROMPT-$(echo "$TARGETS" | tr ',' '+')-e$EPOCHS-lr$LR}
set -euo pipefail
cd "$(dirname "$0")/.."
export QLORANER_IN_CONTAINER=1 QLORANER_CACHE=${QLORANER_CACHE:-/root/qcache}
start=$(date +%s)
./run_train.sh --prompt "$PROMPT" --epochs "$EPOCHS" --lr "$LR" --target-modules "$TARGETS" --lora-r "$LORA_R" \
  --lora-alpha "$LORA_ALPHA" --batch-size "$BATCH" --output-dir "$RUN" --save-every 400 --no-eval --no-gradient-checkpointing
trained=$(date +%s)
extra=()
[ "$COMPARE_BASE" = 1 ] && extra+=(--compare-base)
./run_eval.sh --adapter "$RUN/final" --batch-size "$EVAL_BATCH" --output-dir "$RUN/eval" "${extra[@]}"
echo "accuracy: train $((trained - start)) s, eval $(($(date +%s) - trained)) s, run dir $RUN"
if [ -n "${OUT:-}" ]; then  # the device tool's return folder
  name=$(basename "$RUN")
  mkdir -p "$OUT/$name"
  cp "$RUN/eval/metrics.json" "$RUN/eval/comparison.md" "$OUT/$name/"
  gzip -c "$RUN/eval/responses.jsonl" > "$OUT/$name/responses.jsonl.gz"
  [ -f "$RUN/eval/responses_base.jsonl" ] && gzip -c "$RUN/eval/responses_base.jsonl" > "$OUT/$name/responses_base.jsonl.gz"
  tar czf "$OUT/$name/adapter.tgz" -C "$RUN" final
fi
