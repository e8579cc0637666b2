#!/usr/bin/env bash
# Training speed round on one GPU, after the bundle's two-step start:  . /root/qdev/env.sh && bash benchmarks/train_speed.sh
# 1. profile_train.py: where one 16-sequence step's time goes (torch.profiler, checkpointing on, eager).
# 2. bench_train.py: the peer, then our loop with one change at a time (RUNS, in order; each written to $OUT as done).
# Everything is time-boxed (PROFILE_S, BENCH_S) so a short lease still returns what was measured.
PROFILE_S=${PROFILE_S:-120}
BENCH_S=${BENCH_S:-400}
RUNS=${RUNS:-peer,ours-ckpt,ours-ckpt-compile,ours-ckpt-fp32-frozen,ours-ckpt-mb8-compile,ours-ckpt-full-head,ours-ckpt-eager-attention}
set -uo pipefail
cd "$(dirname "$0")" || exit 1
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp}
quiet() { grep --line-buffered -vE "Loading|it/s\]|^\s*$"; }
start=$(date +%s)
python3 -c "import bench_train; bench_train.make_model()" 2>&1 | quiet
echo "model ready after $(( $(date +%s) - start )) s"
[ "$PROFILE_S" = 0 ] || timeout "$PROFILE_S" python3 profile_train.py 2>&1 | quiet | tail -n 70
echo "profile done after $(( $(date +%s) - start )) s"
BENCH_RUNS=$RUNS timeout "$BENCH_S" python3 bench_train.py 2>&1 | quiet
echo "bench done after $(( $(date +%s) - start )) s"
