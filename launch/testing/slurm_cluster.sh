#!/usr/bin/env bash
# A real single-host Slurm cluster for testing launch/slurm.sbatch (CI and development).
#   launch/testing/slurm_cluster.sh up     # install (Debian packages) when missing, configure, start
#   export SLURM_CONF=/tmp/convmixer-slurm/slurm.conf   # what `up` prints; then sbatch/squeue work
#   launch/testing/slurm_cluster.sh down   # stop the daemons and remove the directory
# Everything lives in one temporary directory (SLURM_CLUSTER_DIR, default /tmp/convmixer-slurm):
# munge with its own key and socket, slurm.conf, state, spool and logs. One node (`localhost`), this
# host with all its CPUs, no GPUs, no cgroups or systemd (proctrack/linuxproc, task/none).
# `up` is idempotent (a running cluster is reused); `down` stops only the daemons it started.
# Needs root (munged runs as user munge, slurmd launches jobs). Packages: slurmctld slurmd
# slurm-client munge (~8 MB), installed with apt-get when missing. Exit code 77 (with one line on
# stderr) means "cannot run here": no apt-get to install the missing packages, or not root.
set -euo pipefail
usage() {
  echo "usage: launch/testing/slurm_cluster.sh up|down|status"
  echo "  env: SLURM_CLUSTER_DIR (default /tmp/convmixer-slurm), SLURM_CLUSTER_PORT (slurmctld port,"
  echo "       default 6817; slurmd uses the next one)"
}
dir=${SLURM_CLUSTER_DIR:-/tmp/convmixer-slurm}
ctld_port=${SLURM_CLUSTER_PORT:-6817}
host=$(hostname -s)
# The node's name is what jobs see in SLURM_STEP_NODELIST and what TensorFlow's Slurm resolver
# connects to: "localhost" resolves everywhere, this host's name may not (containers).
node=localhost
conf=$dir/slurm.conf
export SLURM_CONF=$conf

cannot_run() { echo "slurm_cluster.sh: cannot run here: $*" >&2; exit 77; }

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  (( ${#missing[@]} == 0 )) && return 0
  command -v apt-get >/dev/null || cannot_run "Slurm is not installed (${missing[*]} missing) and apt-get is absent; install them with your package manager"
  (( EUID == 0 )) || cannot_run "installing ${missing[*]} needs root (apt-get)"
  echo "slurm_cluster.sh: installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

# The pid in FILE when that process is alive.
alive_pid() {
  local pid
  [[ -r $1 ]] || return 1
  pid=$(<"$1")
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

node_state() { sinfo -h -n "$node" -o %T 2>/dev/null | head -n 1; }

write_config() {
  local cpus
  cpus=$(nproc)
  mkdir -p "$dir"/{munge,state,spool,log}
  cat >"$conf" <<EOF
# Single-host test cluster written by launch/testing/slurm_cluster.sh.
ClusterName=convmixer-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$((ctld_port + 1))
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=30
NodeName=$node NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  alive_pid "$dir/munge/munged.pid" >/dev/null && return 0
  if [[ ! -s $dir/munge/munge.key ]]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  fi
  chown -R munge:munge "$dir/munge"
  chmod 755 "$dir/munge"
  chmod 400 "$dir/munge/munge.key"
  runuser -u munge -- munged --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
    --seed-file="$dir/munge/munged.seed"
}

start_daemon() {  # NAME PIDFILE ARGS...
  local name=$1 pidfile=$2
  shift 2
  alive_pid "$pidfile" >/dev/null && return 0
  setsid "$name" -D "$@" </dev/null >>"$dir/log/$name.out" 2>&1 &
  echo $! >"$pidfile"
}

up() {
  install_packages
  (( EUID == 0 )) || cannot_run "starting munged and slurmd needs root"
  if alive_pid "$dir/slurmctld.pid" >/dev/null && [[ $(node_state) == idle* ]]; then
    echo "slurm_cluster.sh: already up; export SLURM_CONF=$conf"
    return 0
  fi
  write_config
  start_munge
  start_daemon slurmctld "$dir/slurmctld.pid" -f "$conf"
  start_daemon slurmd "$dir/slurmd.pid" -f "$conf" -N "$node"
  local deadline=$((SECONDS + 60)) state=""
  while (( SECONDS < deadline )); do
    state=$(node_state)
    if [[ $state == idle* || $state == mixed* || $state == allocated* ]]; then
      echo "slurm_cluster.sh: up (node $node, $(nproc) CPUs, state $state); export SLURM_CONF=$conf"
      return 0
    fi
    sleep 0.5
  done
  echo "slurm_cluster.sh: the node did not become idle within 60 s (state '${state}'); logs in $dir/log" >&2
  tail -n 5 "$dir"/log/*.log >&2 || true
  exit 1
}

stop_pidfile() {
  local pid i
  pid=$(alive_pid "$1") || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

down() {
  if [[ ! -d $dir ]]; then
    echo "slurm_cluster.sh: not running (no $dir)"
    return 0
  fi
  # Jobs first, so that no worker outlives the cluster.
  if alive_pid "$dir/slurmctld.pid" >/dev/null; then
    scancel --full --signal=KILL --state=RUNNING --user="$(id -un)" 2>/dev/null || true
    scancel --user="$(id -un)" 2>/dev/null || true
  fi
  stop_pidfile "$dir/slurmd.pid"
  stop_pidfile "$dir/slurmctld.pid"
  stop_pidfile "$dir/munge/munged.pid"
  rm -rf "$dir"
  echo "slurm_cluster.sh: down"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) node_state ;;
  -h|--help) usage ;;
  *) usage >&2; exit 2 ;;
esac
