#!/usr/bin/env bash
# Evaluates a base model or a trained adapter on CoNLL-2003. Usage: ./run_eval.sh [flags]  (--help lists them)
# QLORANER_NPROC=N runs N processes through torchrun (see env.sh).
# Environment: CONLL_DIR, MLFLOW_TRACKING_URI, QLORANER_MODEL / QLORANER_ADAPTER (defaults for --model / --adapter).
set -euo pipefail
# shellcheck source=env.sh
. "$(dirname "$0")/env.sh"
# Run in the user's folder (relative paths in flags are theirs), with the code of this checkout, never a module of
# that folder (PYTHONSAFEPATH: the folder is not put first on the module path).
export PYTHONPATH="$QLORANER_ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
defaults=()
[ -n "${QLORANER_MODEL:-}" ] && defaults+=(--model "$QLORANER_MODEL")
[ -n "${QLORANER_ADAPTER:-}" ] && defaults+=(--adapter "$QLORANER_ADAPTER")
qloraner_launch qloraner.evaluate "${defaults[@]}" "$@"
