#!/usr/bin/env bash
# Installs (if missing) and starts munge, slurmctld and slurmd on this machine, for CI.
# Usage: tests/slurm/start.sh DIR   -> writes DIR/slurm.conf and DIR/pids; prints the SLURM_CONF path.
set -euo pipefail
dir=$(mkdir -p "$1" && cd "$1" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >&2
fi
chmod 755 "$dir"  # munged runs as munge and must reach its folder
mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
chown munge:munge "$dir/munge"
[ -f /etc/munge/munge.key ] || { mungekey --create >&2 || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 2>/dev/null; }
chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
runuser -u munge -- /usr/sbin/munged --socket="$dir/munge/munge.socket" --pid-file="$dir/munge/munged.pid" \
  --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
host=$(hostname -s)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
sed -e "s|@HOST@|$host|g" -e "s|@DIR@|$dir|g" -e "s|@CPUS@|$(nproc)|g" -e "s|@MEM@|$mem|g" \
    -e "s|@CTLD_PORT@|$(free_port)|g" -e "s|@SLURMD_PORT@|$(free_port)|g" "$here/slurm.conf.in" > "$dir/slurm.conf"
sed -e "s|@HOST@|$host|g" "$here/gres.conf.in" > "$dir/gres.conf"
# munge's socket is where slurm looks for it only by default; point slurm at ours
echo "AuthInfo=socket=$dir/munge/munge.socket" >> "$dir/slurm.conf"
export SLURM_CONF="$dir/slurm.conf"
/usr/sbin/slurmctld -f "$SLURM_CONF"
/usr/sbin/slurmd -f "$SLURM_CONF"
for _ in $(seq 30); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    cat "$dir/munge/munged.pid" "$dir/slurmctld.pid" "$dir/slurmd.pid" > "$dir/pids"
    echo "$SLURM_CONF"
    exit 0
  fi
  sleep 1
done
echo "slurm did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
exit 1
