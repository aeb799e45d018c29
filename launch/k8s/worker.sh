#!/usr/bin/env bash
# Container entry point of launch/k8s/tfjob.yaml: runs `python -m convmixer_dist.main ARGS...` and
# passes SIGTERM (pod deletion, node drain) on to it. The run then saves a checkpoint and exits 75;
# this script exits 143 instead, because the TFJob's `restartPolicy: ExitCode` restarts a pod only
# for exit codes >= 128 (1-127 are permanent failures: a usage error or a crash is not retried).
#   env: PYTHON (interpreter, default python)
set -uo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  echo "usage: launch/k8s/worker.sh [flags for convmixer_dist.main ...]   (exit 75 -> 143: retried)"
  exit 0
fi
"${PYTHON:-python}" -m convmixer_dist.main "$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM  # As PID 1 the shell would otherwise ignore SIGTERM.
trap 'kill -INT "$child" 2>/dev/null' INT
while kill -0 "$child" 2>/dev/null; do wait "$child"; done
code=0
wait "$child" || code=$?
if (( code == 75 )); then
  echo "launch: preempted (checkpoint saved, exit 75); exiting 143 so that the pod is restarted and resumes" >&2
  exit 143
fi
exit "$code"
