#!/usr/bin/env bash
# One worker of `--strategy=multi_worker` per host, started over ssh with the same command.
# HOSTS_FILE: one "host" or "host:port" per line (default port 2222); '#' comments and blank lines
# are skipped; the first host is the chief (worker 0). Each remote command is quoted with printf %q;
# host strings are never evaluated by a shell.
set -euo pipefail
usage() {
  echo "usage: launch/ssh.sh HOSTS_FILE [flags for convmixer_dist.main ...]"
  echo "  env: SSH (default ssh), REMOTE_DIR (cd there first, default: this checkout's path),"
  echo "       REMOTE_PYTHON (default python), LOG_DIR (default ./logs)"
}
if [[ ${1:-} == -h || ${1:-} == --help ]]; then usage; exit 0; fi
hosts_file=${1:-}
if [[ -z $hosts_file || ! -f $hosts_file || ! -r $hosts_file ]]; then
  echo "error: launch/ssh.sh: HOSTS_FILE='${hosts_file}' is not a readable file (see -h)" >&2; exit 2
fi
shift
here=$(cd "$(dirname "$0")" && pwd)
remote_dir=${REMOTE_DIR:-$(dirname "$here")}
remote_python=${REMOTE_PYTHON:-python}
log_dir=${LOG_DIR:-logs}
ssh_cmd=${SSH:-ssh}
# shellcheck source=launch/_supervise.sh
source "$here/_supervise.sh"

hosts=()
line_no=0
while IFS= read -r line || [[ -n $line ]]; do
  line_no=$((line_no + 1))
  line=${line%%#*}
  line=${line#"${line%%[![:space:]]*}"}  # Surrounding blanks only: `node1 2222` is an error, not node12222.
  line=${line%"${line##*[![:space:]]}"}
  [[ -z $line ]] && continue
  # Checked as text before any arithmetic (no leading zeros, at most 5 digits); a host never starts
  # with '-' (ssh would read it as an option).
  if [[ $line =~ ^[A-Za-z0-9_.][A-Za-z0-9._-]*$ ]]; then
    line="$line:2222"
  elif ! [[ $line =~ ^[A-Za-z0-9_.][A-Za-z0-9._-]*:([1-9][0-9]{0,4})$ ]] || (( BASH_REMATCH[1] > 65535 )); then
    echo "error: $hosts_file:$line_no: '$line' is not a host or host:port (port 1..65535)" >&2; exit 2
  fi
  hosts+=("$line")
done <"$hosts_file"
if (( ${#hosts[@]} < 2 )); then
  echo "error: $hosts_file lists ${#hosts[@]} host(s); multi_worker needs at least 2" >&2; exit 2
fi
workers=$(printf '"%s",' "${hosts[@]}")
workers=${workers%,}
mkdir -p "$log_dir"
# Each ssh reads its stdin from a pipe that only this script writes to. When this script ends (done,
# stopped, or killed) or the connection drops, the remote side reads end-of-file and sends SIGTERM
# to its worker (which then stops in seconds in any phase, start-up included): no orphaned workers.
fifo=$(mktemp -u "${TMPDIR:-/tmp}/ssh-launch.XXXXXX")
mkfifo -m 600 "$fifo"
exec {keep_open}<>"$fifo" {worker_stdin}<"$fifo"
rm -f "$fifo"
for i in "${!hosts[@]}"; do
  host=${hosts[$i]%:*}
  tf_config="{\"cluster\": {\"worker\": [$workers]}, \"task\": {\"type\": \"worker\", \"index\": $i}}"
  remote=$(printf 'cd %q || exit 1; exec 3<&0; TF_CONFIG=%q %q -m convmixer_dist.main --strategy=multi_worker' \
    "$remote_dir" "$tf_config" "$remote_python")
  if (( $# > 0 )); then remote+=$(printf ' %q' "$@"); fi
  remote+=' & w=$!; { cat <&3; kill -TERM $w; } >/dev/null 2>&1 & wait $w'
  log="$log_dir/worker-$i.log"
  printf '+ %s %s %s > %s\n' "$ssh_cmd" "$host" "$remote" "$log"
  "$ssh_cmd" "$host" "$remote" <&"$worker_stdin" {keep_open}>&- >"$log" 2>&1 &
  pids+=($!)
  names+=("worker $i on $host (log: $log)")
done
status=0
supervise || status=$?
if (( status == 0 )); then echo "launch: all ${#hosts[@]} workers finished; logs in $log_dir"; fi
exit "$status"
