# Shared by local.sh and ssh.sh (sourced): start workers, stop all of them when one fails or on
# Ctrl-C/SIGTERM, and exit with the first failing worker's code.
pids=()
names=()

stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}

on_signal() {
  echo "launch: interrupted; stopping all workers" >&2
  stop_all
  wait || true
  exit 130
}
trap on_signal INT TERM

# supervise: wait for every worker; on the first failure stop the others.
supervise() {
  local remaining=${#pids[@]} failed=0 pid code i
  while (( remaining > 0 )); do
    code=0
    wait -n -p pid || code=$?
    remaining=$((remaining - 1))
    if (( code != 0 && failed == 0 )); then
      failed=$code
      for i in "${!pids[@]}"; do
        [[ ${pids[$i]} == "$pid" ]] && echo "launch: ${names[$i]} failed with exit code $code; stopping the other workers" >&2
      done
      stop_all
    fi
  done
  return "$failed"
}
