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

# supervise: wait for every worker; on the first failure stop the others. Other background jobs of
# the caller (local.sh's `tail` of the chief's log) neither count as a worker nor end the wait.
supervise() {
  local failed=0 pid code i worker
  local -a waiting=("${pids[@]}")
  while (( ${#waiting[@]} > 0 )); do
    code=0
    wait -n -p pid || code=$?
    [[ -n ${pid:-} ]] || break  # no child left to wait for (-p unsets pid)
    worker=0
    for i in "${!waiting[@]}"; do
      if [[ ${waiting[$i]} == "$pid" ]]; then unset 'waiting[i]'; worker=1; fi
    done
    (( worker )) || continue
    waiting=("${waiting[@]}")
    if (( code != 0 && failed == 0 )); then
      failed=$code
      for i in "${!pids[@]}"; do
        if [[ ${pids[$i]} == "$pid" ]]; then
          echo "launch: ${names[$i]} failed with exit code $code; stopping the other workers" >&2
        fi
      done
      stop_all
    fi
  done
  return "$failed"
}
