#!/usr/bin/env bash
# Scale-out on one machine with 2 GPUs (nvidia-h100-x2), after the bundle's two-step start:
#   . /root/qdev/env.sh && bash benchmarks/scale_out.sh
# 1. Training speed of the LLaMA-2-7B shape (bench_train.py), 16 sequences a step on both sides:
#    1 GPU (micro-batch 8 x 2, and 16 x 1) against 2 GPUs under torchrun (8 per GPU, DDP on the LoRA parameters).
# 2. The full test split through ./run_eval.sh on the 7B shape (EVAL_NEW_TOKENS new tokens a sentence): 2 GPUs, then 1.
# 3. Evaluation speed, part (a) of bench_eval.py: SmolLM2 fine-tuned here on 2 GPUs for A_STEPS steps, then
#    the original's `pipeline` on PEER_SENTENCES sentences against our evaluator (same subset, then the full split).
# Each part is time-boxed and writes its JSON under $OUT as soon as it has it.
EVAL_NEW_TOKENS=${EVAL_NEW_TOKENS:-12}  # the fine-tuned SmolLM2's mean response (40,594 tokens / 3,453 sentences)
A_STEPS=${A_STEPS:-120}
export PEER_SENTENCES=${PEER_SENTENCES:-40}
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export QLORANER_IN_CONTAINER=1 QLORANER_CACHE=${QLORANER_CACHE:-/root/qcache} PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp}
quiet() { grep --line-buffered -vE "Loading|it/s\]|warn|^\s*$"; }

python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_train; bench_train.make_model()"
BENCH_RUNS=ours-ckpt-mb8,ours-ckpt BENCH_JSON=scale_train_1gpu.json timeout 170 python3 benchmarks/bench_train.py 2>&1 | quiet
BENCH_RUNS=ours-ckpt BENCH_JSON=scale_train_2gpu.json timeout 110 torchrun --standalone --nproc-per-node 2 \
  benchmarks/bench_train.py 2>&1 | quiet

for n in 2 1; do
  start=$(date +%s.%N)
  QLORANER_NPROC=$n timeout 110 ./run_eval.sh --model /tmp/bench-llama7b --max-new-tokens "$EVAL_NEW_TOKENS" --batch-size 256 \
    --output-dir "outputs/scale-eval-$n" 2>&1 | quiet
  python3 - "outputs/scale-eval-$n/metrics.json" "$start" "$(date +%s.%N)" > "$OUT/scale_eval_${n}gpu.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
keep = ("world_size", "sentences", "generated_tokens", "seconds", "sentences_per_s", "forward_passes", "device")
print(json.dumps({**{k: m[k] for k in keep}, "command_wall_s": float(sys.argv[3]) - float(sys.argv[2])}, indent=2))
PY
  cat "$OUT/scale_eval_${n}gpu.json"
done

QLORANER_NPROC=2 timeout 120 ./run_train.sh --target-modules all-linear --batch-size 32 --lr 1e-3 --max-steps "$A_STEPS" \
  --warmup-steps 10 --log-every 20 --save-every 0 --no-eval --no-gradient-checkpointing --output-dir outputs/scale-smol 2>&1 | quiet
ADAPTER=outputs/scale-smol/final PART_B=0 BENCH_JSON=bench_eval_a.json timeout 200 python3 benchmarks/bench_eval.py 2>&1 | quiet
