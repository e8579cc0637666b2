#!/usr/bin/env bash
# Tags text with a trained adapter. Usage: ./run_tag.sh --adapter DIR [FILE ...]  (standard input without FILE;
# --help lists the flags). Output on standard output, progress and errors on standard error.
# Environment: QLORANER_MODEL / QLORANER_ADAPTER (defaults for --model / --adapter).
set -euo pipefail
# shellcheck source=env.sh
. "$(dirname "$0")/env.sh"
defaults=()
[ -n "${QLORANER_MODEL:-}" ] && defaults+=(--model "$QLORANER_MODEL")
[ -n "${QLORANER_ADAPTER:-}" ] && defaults+=(--adapter "$QLORANER_ADAPTER")
# One process, never torchrun (QLORANER_NPROC): every rank would tag and print everything.
exec "$PY" -m qloraner.tag_cli "${defaults[@]}" "$@"
