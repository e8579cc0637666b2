#!/usr/bin/env bash
# Runs the test suite. Usage: ./run_tests.sh [pytest args]
set -euo pipefail
# shellcheck source=env.sh
. "$(dirname "$0")/env.sh"
cd "$QLORANER_ROOT"
set +e
"$PY" -m pytest "$@"
rc=$?
set -e
[ "$rc" -eq 5 ] && { echo "run_tests.sh: no tests ran" >&2; exit 1; }
exit "$rc"
