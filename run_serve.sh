#!/usr/bin/env bash
# Serves a trained adapter as an HTTP JSON API. Usage: ./run_serve.sh --adapter DIR [--host 127.0.0.1 --port 8080]
# (--help lists the flags). POST /tag, GET /health, OpenAPI docs at /docs. SIGTERM: answers what is in flight, exit 0.
# Environment: QLORANER_MODEL / QLORANER_ADAPTER (defaults for --model / --adapter).
set -euo pipefail
# shellcheck source=env.sh
. "$(dirname "$0")/env.sh"
cd "$QLORANER_ROOT"
defaults=()
[ -n "${QLORANER_MODEL:-}" ] && defaults+=(--model "$QLORANER_MODEL")
[ -n "${QLORANER_ADAPTER:-}" ] && defaults+=(--adapter "$QLORANER_ADAPTER")
# One process, never torchrun (QLORANER_NPROC): every rank would bind the port. exec: SIGTERM reaches the server.
exec "$PY" -m qloraner.serve "${defaults[@]}" "$@"
