#!/usr/bin/env bash
# Stops what start.sh started, by pid. Usage: tests/slurm/stop.sh DIR
set -uo pipefail
dir=$1
for f in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
  [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null
done
sleep 1
exit 0
