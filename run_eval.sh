#!/usr/bin/env bash
# Evaluates a base model or a trained adapter on CoNLL-2003. Usage: ./run_eval.sh [flags]  (--help lists them)
# QLORANER_NPROC=N runs N processes through torchrun (see env.sh).
# Environment: CONLL_DIR, MLFLOW_TRACKING_URI, QLORANER_MODEL / QLORANER_ADAPTER (defaults for --model / --adapter).
set -euo pipefail
# shellcheck source=env.sh
. "$(dirname "$0")/env.sh"
defaults=()
[ -n "${QLORANER_MODEL:-}" ] && defaults+=(--model "$QLORANER_MODEL")
[ -n "${QLORANER_ADAPTER:-}" ] && defaults+=(--adapter "$QLORANER_ADAPTER")
qloraner_launch qloraner.evaluate "${defaults[@]}" "$@"
