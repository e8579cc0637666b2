#!/usr/bin/env bash
# Fine-tunes a LoRA adapter, then evaluates it. Usage: ./run_train.sh [flags]  (--help lists them)
# QLORANER_NPROC=N runs N processes through torchrun (see env.sh).
# Environment: CONLL_DIR (data), MLFLOW_TRACKING_URI, QLORANER_CACHE (converted default model),
# QLORANER_MODEL / QLORANER_OUTPUT_DIR (defaults for --model / --output-dir).
set -euo pipefail
# shellcheck source=env.sh
. "$(dirname "$0")/env.sh"
defaults=()
[ -n "${QLORANER_MODEL:-}" ] && defaults+=(--model "$QLORANER_MODEL")
[ -n "${QLORANER_OUTPUT_DIR:-}" ] && defaults+=(--output-dir "$QLORANER_OUTPUT_DIR")
qloraner_launch qloraner.train "${defaults[@]}" "$@"
