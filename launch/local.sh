#!/usr/bin/env bash
# N workers of `--strategy=multi_worker` on this machine, for developing and testing the multi-node
# path without a cluster. Ports are picked free; TF_CONFIG is written per worker; logs go to
# MODEL_DIR/logs/worker-I.log (worker 0, the chief, is also shown live).
set -euo pipefail
usage() {
  echo "usage: launch/local.sh N --model_dir=DIR [flags for convmixer_dist.main ...]"
  echo "  runs N >= 2 worker processes of: python -m convmixer_dist.main --strategy=multi_worker FLAGS"
  echo "  env: PYTHON (interpreter, default python)"
}
if [[ ${1:-} == -h || ${1:-} == --help ]]; then usage; exit 0; fi
n=${1:-}
# Checked as text before any arithmetic: bash reads 08 as bad octal and wraps huge numbers.
if ! [[ $n =~ ^[1-9][0-9]{0,2}$ ]] || (( n < 2 || n > 256 )); then
  echo "error: launch/local.sh: N='${n}': expected a decimal number of workers in 2..256 (see -h)" >&2; exit 2
fi
shift
model_dir=""
for arg in "$@"; do
  case $arg in --model_dir=*) model_dir=${arg#--model_dir=} ;; esac
done
if [[ -z $model_dir ]]; then
  echo "error: launch/local.sh: pass --model_dir=DIR (worker logs go to DIR/logs)" >&2; exit 2
fi
python_bin=${PYTHON:-python}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=launch/_supervise.sh
source "$here/_supervise.sh"

# Free ports, asked from the OS (the system python3 suffices; $PYTHON may be any interpreter).
mapfile -t ports < <(python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("localhost", 0))
print("\n".join(str(s.getsockname()[1]) for s in socks))' "$n")
hosts=$(printf '"localhost:%s",' "${ports[@]}")
hosts=${hosts%,}
mkdir -p "$model_dir/logs"
for ((i = 0; i < n; i++)); do
  tf_config="{\"cluster\": {\"worker\": [$hosts]}, \"task\": {\"type\": \"worker\", \"index\": $i}}"
  log="$model_dir/logs/worker-$i.log"
  : >"$log"  # exists before `tail` below opens it
  printf '+ TF_CONFIG=%q %q -m convmixer_dist.main --strategy=multi_worker' "$tf_config" "$python_bin"
  printf ' %q' "$@"
  printf ' > %q 2>&1\n' "$log"
  TF_CONFIG=$tf_config "$python_bin" -m convmixer_dist.main --strategy=multi_worker "$@" >"$log" 2>&1 &
  pids+=($!)
  names+=("worker $i (log: $log)")
done
tail -n +1 -f "$model_dir/logs/worker-0.log" --pid="${pids[0]}" &
tail_pid=$!
status=0
supervise || status=$?
sleep 0.2
kill "$tail_pid" 2>/dev/null || true
if (( status == 0 )); then echo "launch: all $n workers finished; logs in $model_dir/logs"; fi
exit "$status"
