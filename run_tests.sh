#!/usr/bin/env bash
# Runs the test suite (what CI runs). Usage: ./run_tests.sh [--quick] [pytest args]
# --quick: the pure and small tests and the linter, a few minutes on two cores: run it between edits.
set -euo pipefail
# shellcheck source=env.sh
. "$(dirname "$0")/env.sh"
cd "$QLORANER_ROOT"
if [ "${1:-}" = --quick ]; then
  shift
  "$PY" -m ruff check qloraner tests benchmarks
  "$PY" -m ruff format --check qloraner tests benchmarks
  set -- -m "not slow" tests/test_bio.py tests/test_parse.py tests/test_conll.py tests/test_config.py \
    tests/test_memory.py tests/test_text.py tests/test_metrics.py tests/test_progress.py tests/test_results_doc.py \
    tests/test_data.py tests/test_speed.py tests/test_prompts.py tests/test_sample.py "$@"
fi
# One worker per core (at most 4: each holds models in memory), each torch on one thread: a test spends seconds
# importing torch on one core, so two workers keep both of CI's cores busy. QLORANER_TEST_WORKERS=0 (or -n 0 among the
# pytest args) runs serially, as --pdb needs.
cores=$(nproc)  # the cores this process may use; a container's CPU quota (docker --cpus) can allow fewer
if read -r quota period 2>/dev/null < /sys/fs/cgroup/cpu.max && [ "$quota" != max ]; then
  allowed=$(( (quota + period - 1) / period ))  # the quota in cores, rounded up
  [ "$allowed" -lt "$cores" ] && cores=$allowed
fi
workers=${QLORANER_TEST_WORKERS:-$cores}
[ "$workers" -gt 4 ] && workers=4
[ "$workers" -le 1 ] && workers=0
[ "$workers" -gt 1 ] && export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
set +e
"$PY" -m pytest -n "$workers" "$@"
rc=$?
set -e
[ "$rc" -eq 5 ] && { echo "run_tests.sh: no tests ran" >&2; exit 1; }
exit "$rc"
