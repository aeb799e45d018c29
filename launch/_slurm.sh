# Helpers of launch/slurm.sbatch (sourced; tested without Slurm in tests/test_slurm_script.py).
# `bash launch/_slurm.sh run_task CMD...` runs one worker as an srun task (see run_task).

# GPUs per node: $GPUS_PER_NODE if set, else what sbatch was asked for (--gpus-per-node=[type:]N,
# or --gres=gpu:N via SLURM_GPUS_ON_NODE), else 0 (a CPU-only job).
gpus_per_node() {
  local gpus=${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}}
  gpus=${gpus##*:}
  # Checked as text before any arithmetic: bash reads 08 as bad octal and wraps huge numbers.
  if ! [[ $gpus =~ ^(0|[1-9][0-9]?)$ ]] || (( gpus > 64 )); then
    echo "error: launch/slurm.sbatch: GPUs per node '$gpus' (GPUS_PER_NODE or --gpus-per-node) is not a decimal number in 0..64" >&2
    return 2
  fi
  echo "$gpus"
}

# srun options for the task layout: one task per GPU on GPU nodes; on CPU-only nodes the tasks the
# job was allocated (sbatch --ntasks / --ntasks-per-node; default one per node).
srun_geometry() {  # GPUS_PER_NODE NUM_NODES
  if (( $1 > 0 )); then
    echo "--ntasks-per-node=$1 --ntasks=$(( $1 * $2 ))"
  fi
}

# A task's exit code as srun should see it. srun returns the highest code of all tasks, so codes
# are ranked: 0 (done) < 75 (preempted: checkpoint saved) < any failure. Failures below 75 (1 error,
# 2 usage, 3 diverged) become 200+code so that they outrank 75; codes above 75 (128+N: killed by
# signal N) stay as they are.
task_exit_code() {  # CODE
  local code=$1
  if (( code == 0 || code == 75 || code > 75 )); then
    echo "$code"
  else
    echo $(( code + 200 > 255 ? 255 : code + 200 ))
  fi
}

# What the batch script does with srun's exit code: prints "done", "requeue", or "fail CODE" with
# the worker's own code (200+N decoded back to N).
job_action() {  # SRUN_EXIT_CODE
  local code=$1
  if (( code == 0 )); then
    echo done
  elif (( code == 75 )); then
    echo requeue
  elif (( code > 200 && code < 255 )); then
    echo "fail $(( code - 200 ))"
  else
    echo "fail $code"
  fi
}

# One srun task: run CMD, outlive the signals Slurm sends to all of the task's processes (the
# worker handles them), and exit with task_exit_code of the worker's code.
run_task() {  # CMD...
  local child code
  trap ':' TERM USR1 INT
  "$@" &
  child=$!
  while kill -0 "$child" 2>/dev/null; do
    wait "$child" || true
  done
  code=0
  wait "$child" || code=$?
  if (( code != 0 && code != 75 )); then
    echo "launch: task ${SLURM_PROCID:-?} on $(hostname -s) exited with code $code" >&2
  fi
  exit "$(task_exit_code "$code")"
}

if [[ ${BASH_SOURCE[0]} == "$0" && ${1:-} == run_task ]]; then
  shift
  run_task "$@"
fi
