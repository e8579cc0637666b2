#!/usr/bin/env bash
# Accuracy attempts side by side: several SmolLM2 fine-tunes at once on one GPU, then each adapter on the full
# test split. One fine-tune of a 135M model keeps the GPU idle most of the time (Python and kernel launches bound
# its step), so runs sharing the card cost little time each. On the GPU machine, after the bundle's two-step start:
#   . /root/qdev/env.sh && bash benchmarks/accuracy_sweep.sh
# PHASE=train or PHASE=eval runs one half (for device calls shorter than the whole). Per run, in $OUT/<name>/:
# train.log, train_curve.json, metrics.json, comparison.md, responses*.jsonl.gz.
# Settings (environment variables override):
TRAIN_S=${TRAIN_S:-480}        # time box of each fine-tune; SIGTERM saves a checkpoint, which is then evaluated
EVAL_S=${EVAL_S:-540}          # time box of each evaluation
EVAL_LIMIT=${EVAL_LIMIT:-0}    # test sentences evaluated (0 = all 3,453)
EVAL_BATCH=${EVAL_BATCH:-256}  # 256, not 1024: evaluations share the card, and 1024 rows of KV cache each would not fit
GIB_PER_RUN=${GIB_PER_RUN:-12} # runs started: free GPU memory / this, taken from the top of RUNS (10.6 GiB measured)
PHASE=${PHASE:-all}            # train, eval or all
SWEEP=${SWEEP:-outputs/sweep}
COMMON=${COMMON:-"--epochs 1.2 --lr 1e-3 --batch-size 32 --target-modules all-linear --lora-r 64 --lora-alpha 16 --lora-dropout 0.1"}
RUNS=(  # name | flags after COMMON (a later flag wins) | 1: also evaluate the base model with this run's prompt
  "ref||0"
  "typed|--prompt typed|1"
  "fewshot|--prompt fewshot|1"
  "json|--response-format json|1"
  "lr5e-4|--lr 5e-4|0"
  "r16-a32|--lora-r 16 --lora-alpha 32|0"
  "epochs0.6|--epochs 0.6|0"
  "lr2e-3|--lr 2e-3|0"
)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
# shellcheck source=benchmarks/lib.sh
. benchmarks/lib.sh
export QLORANER_IN_CONTAINER=1 QLORANER_CACHE=${QLORANER_CACHE:-/root/qcache} PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/sweep-out}
free=$(nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits | head -n 1)
n=$((free / 1024 / GIB_PER_RUN))
[ "$n" -gt "${#RUNS[@]}" ] && n=${#RUNS[@]}
echo "sweep: ${free} MiB free, $n of ${#RUNS[@]} runs at once"
python3 -c "from qloraner.model import resolve_model; resolve_model(None)"  # convert the default model once, not n times

if [ "$PHASE" != eval ]; then
  for spec in "${RUNS[@]:0:n}"; do
    IFS="|" read -r name flags _ <<< "$spec"
    mkdir -p "$OUT/$name"
    # shellcheck disable=SC2086  # COMMON and flags are word lists
    timeout -s TERM "$TRAIN_S" ./run_train.sh $COMMON $flags --output-dir "$SWEEP/$name" --save-every 100 --log-every 20 \
      --no-eval --no-gradient-checkpointing > "$OUT/$name/train.log" 2>&1 &
  done
  wait
  for spec in "${RUNS[@]:0:n}"; do
    IFS="|" read -r name _ _ <<< "$spec"
    python3 benchmarks/train_curve.py "$SWEEP/$name" > "$OUT/$name/train_curve.json"
    echo "trained $name: $(newest_adapter "$SWEEP/$name") $(grep -oE "[0-9]+/[0-9]+ \[" "$OUT/$name/train.log" | tail -n 1)"
  done
fi

if [ "$PHASE" != train ]; then
  for spec in "${RUNS[@]:0:n}"; do
    IFS="|" read -r name _ base <<< "$spec"
    ckpt=$(newest_adapter "$SWEEP/$name")
    [ -n "$ckpt" ] || { echo "eval $name: no checkpoint"; continue; }
    extra=()
    [ "$base" = 1 ] && extra+=(--compare-base)
    mkdir -p "$OUT/$name"
    ( timeout -s TERM "$EVAL_S" ./run_eval.sh --adapter "$ckpt" --batch-size "$EVAL_BATCH" --limit "$EVAL_LIMIT" --output-dir "$SWEEP/$name/eval" \
        "${extra[@]}" > "$OUT/$name/eval.log" 2>&1
      cp "$SWEEP/$name/eval/metrics.json" "$SWEEP/$name/eval/comparison.md" "$OUT/$name/" 2>/dev/null
      for f in "$SWEEP/$name"/eval/responses*.jsonl; do [ -f "$f" ] && gzip -c "$f" > "$OUT/$name/$(basename "$f").gz"; done
      echo "eval $name ($ckpt): $(python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print('F1', round(100*m['f1'],2), 'base F1', round(100*m['base']['f1'],2) if 'base' in m else '-', m['seconds'] if 'seconds' in m else '')" "$OUT/$name/metrics.json" 2>/dev/null || echo failed)"
    ) &
  done
  wait
fi
