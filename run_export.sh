#!/usr/bin/env bash
# Merges a trained adapter into its base and writes a checkpoint other tools load.
# Usage: ./run_export.sh --adapter DIR --output DIR [--format hf|gguf] [--dtype bf16|f16|f32|q8_0] [--overwrite]
#   (q8_0 with --format gguf only; --help lists the flags).
# Environment: QLORANER_ADAPTER (default for --adapter).
set -euo pipefail
# shellcheck source=env.sh
. "$(dirname "$0")/env.sh"
cd "$QLORANER_ROOT"
defaults=()
[ -n "${QLORANER_ADAPTER:-}" ] && defaults+=(--adapter "$QLORANER_ADAPTER")
# One process, never torchrun (QLORANER_NPROC): the export is host work, and every rank would write it.
exec "$PY" -m qloraner.export "${defaults[@]}" "$@"
