#!/usr/bin/env bash
# N "hosts" on this machine for testing the multi-node path over a real network and real ssh.
#   launch/testing/netns_cluster.sh up N [--rate=R] [--delay=D]   # idempotent; reshapes in place
#   SSH=/tmp/cmdtb/ssh launch/ssh.sh /tmp/cmdtb/hosts --flagfile=... --model_dir=...
#   launch/testing/netns_cluster.sh status                        # exit 0 when up, 1 when not
#   launch/testing/netns_cluster.sh down
#   launch/testing/netns_cluster.sh install                       # only the packages (what .ci/run does)
# Host I is the network namespace PREFIX-I with the address 198.18.0.(I+1) on its eth0 (198.18.0.0/15
# is reserved for network tests, RFC 2544), a veth pair to a bridge in the namespace PREFIX-sw (the
# "switch", also the login host 198.18.0.254 the ssh wrapper connects from), and an sshd listening on
# port 22 with a generated host key, accepting only a generated client key. Nothing is configured in
# the machine's own namespace, so traffic stays inside these namespaces, and two clusters with
# different prefixes do not meet. --rate shapes every host's link in both directions with tc tbf
# (a full-duplex NIC of rate R: 100mbit, 1gbit, ...); --delay adds one-way delay with tc netem.
# Files (keys, sshd configs and logs, `hosts` for launch/ssh.sh, the `ssh` wrapper) live in DIR.
# Needs root, iproute2 and OpenSSH (server and client; installed with apt-get when missing). Exit
# code 77 with one line on stderr means "cannot run here" (not root, no network namespaces, a missing
# package and no apt-get, no netem in the kernel for --delay); 2 is a usage error.
set -euo pipefail
usage() {
  echo "usage: launch/testing/netns_cluster.sh up N [--rate=R] [--delay=D] | down | status | install"
  echo "  N: hosts, 1..253; R: tc rate per link and direction (e.g. 100mbit, 1gbit); D: one-way delay"
  echo "  (e.g. 2ms, needs the kernel's netem qdisc); neither given: unshaped"
  echo "  env: NETNS_CLUSTER_PREFIX (namespace names, default cmdtb), NETNS_CLUSTER_DIR (files,"
  echo "       default /tmp/\$PREFIX)"
}
prefix=${NETNS_CLUSTER_PREFIX:-cmdtb}
dir=${NETNS_CLUSTER_DIR:-/tmp/$prefix}
switch=$prefix-sw
login_address=198.18.0.254

die() { echo "error: netns_cluster.sh: $*" >&2; exit 2; }
cannot_run() { echo "netns_cluster.sh: cannot run here: $*" >&2; exit 77; }

[[ $prefix =~ ^[a-z][a-z0-9]{0,7}$ ]] || die "NETNS_CLUSTER_PREFIX='$prefix': expected 1-8 lower-case letters or digits, starting with a letter"
address() { echo "198.18.0.$(($1 + 1))"; }
ns_exists() { [[ -e /run/netns/$1 ]]; }
# Our hosts' indices, from the namespaces that exist (sorted numerically).
existing_hosts() {
  local path name
  for path in /run/netns/"$prefix"-*; do
    [[ -e $path ]] || continue
    name=${path##*/}
    if [[ ${name#"$prefix"-} =~ ^[0-9]+$ ]]; then echo "${name#"$prefix"-}"; fi
  done | sort -n
}
alive_pid() {
  local pid
  [[ -r $1 ]] || return 1
  pid=$(<"$1")
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

check_environment() {
  (( EUID == 0 )) || cannot_run "network namespaces need root"
  command -v ip >/dev/null || install_packages iproute2
  command -v tc >/dev/null || install_packages iproute2
  [[ -x /usr/sbin/sshd ]] || install_packages openssh-server
  command -v ssh >/dev/null && command -v ssh-keygen >/dev/null || install_packages openssh-client
}

install_packages() {
  command -v apt-get >/dev/null || cannot_run "$* is not installed and apt-get is absent; install it with your package manager"
  echo "netns_cluster.sh: installing $* with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

write_ssh_files() {
  mkdir -p "$dir/log"
  chmod 700 "$dir"
  [[ -s $dir/ssh_host_ed25519_key ]] || ssh-keygen -q -t ed25519 -N '' -C "$prefix host" -f "$dir/ssh_host_ed25519_key"
  [[ -s $dir/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -C "$prefix client" -f "$dir/id_ed25519"
  cp "$dir/id_ed25519.pub" "$dir/authorized_keys"
  cat >"$dir/ssh_config" <<EOF
# Client side of the test cluster written by launch/testing/netns_cluster.sh.
Host *
  User root
  IdentityFile $dir/id_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile $dir/known_hosts
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  BatchMode yes
  ConnectTimeout 10
  LogLevel ERROR
EOF
  # ssh from the login host: `SSH=$dir/ssh launch/ssh.sh $dir/hosts ...` from this machine's shell.
  cat >"$dir/ssh" <<EOF
#!/bin/sh
exec ip netns exec $switch ssh -F $dir/ssh_config "\$@"
EOF
  chmod 755 "$dir/ssh"
  mkdir -p /run/sshd  # sshd's privilege-separation directory
}

# The tc qdisc of one link end: tbf for the rate, netem under it for the delay.
shape() {
  local netns=$1 dev=$2 rate=$3 delay=$4 burst
  ip netns exec "$netns" tc qdisc del dev "$dev" root 2>/dev/null || true
  if [[ -n $rate ]]; then
    # At least one 64 KiB segment (veth offloads send segments that large) or 5 ms at the rate.
    burst=$(awk -v r="$rate" 'BEGIN { u = r; sub(/^[0-9.]+/, "", u)
      m = u == "kbit" ? 1e3 : u == "mbit" ? 1e6 : u == "gbit" ? 1e9 : 1
      b = (r + 0) * m / 8 * 0.005; printf "%d", b < 65536 ? 65536 : b }')
    ip netns exec "$netns" tc qdisc add dev "$dev" root handle 1: tbf rate "$rate" burst "$burst" latency 100ms
    if [[ -n $delay ]]; then
      ip netns exec "$netns" tc qdisc add dev "$dev" parent 1:1 handle 10: netem delay "$delay" limit 100000
    fi
  elif [[ -n $delay ]]; then
    ip netns exec "$netns" tc qdisc add dev "$dev" root handle 10: netem delay "$delay" limit 100000
  fi
}

# Whether the kernel has netem: probed on a veth pair in a throw-away namespace.
netem_available() {
  local probe=$prefix-probe ok=0
  ip netns add "$probe" 2>/dev/null || return 1
  ip -n "$probe" link add probe0 type veth peer name probe1 >/dev/null 2>&1 &&
    ip netns exec "$probe" tc qdisc add dev probe0 root netem delay 1ms >/dev/null 2>&1 && ok=1
  ip netns del "$probe"
  (( ok ))
}

start_sshd() {
  local i=$1 config=$dir/sshd_config.$1
  cat >"$config" <<EOF
# sshd of host $i of the test cluster written by launch/testing/netns_cluster.sh.
ListenAddress $(address "$i")
Port 22
HostKey $dir/ssh_host_ed25519_key
PidFile $dir/sshd.$i.pid
AuthorizedKeysFile $dir/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
MaxStartups 64
MaxSessions 64
EOF
  alive_pid "$dir/sshd.$i.pid" >/dev/null && return 0
  ip netns exec "$prefix-$i" /usr/sbin/sshd -f "$config" -E "$dir/log/sshd.$i.log"
  local deadline=$((SECONDS + 10))
  until alive_pid "$dir/sshd.$i.pid" >/dev/null; do
    (( SECONDS < deadline )) || { echo "error: sshd of host $i did not start; see $dir/log/sshd.$i.log" >&2; return 1; }
    sleep 0.1
  done
}

# Stop what is running in a namespace (its sshd and anything started in it), then delete it.
remove_namespace() {
  local netns=$1 pids
  ns_exists "$netns" || return 0
  pids=$(ip netns pids "$netns" 2>/dev/null || true)
  if [[ -n $pids ]]; then
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 50); do
      pids=$(ip netns pids "$netns" 2>/dev/null || true)
      [[ -z $pids ]] && break
      sleep 0.1
    done
    # shellcheck disable=SC2086
    [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
  fi
  ip netns del "$netns" 2>/dev/null || true
}

remove_host() {
  remove_namespace "$prefix-$1"
  rm -f "$dir/sshd.$1.pid" "$dir/sshd_config.$1"
}

down() {
  local i
  for i in $(existing_hosts); do remove_host "$i"; done
  remove_namespace "$switch"
  # Only the files `up` writes (DIR may be any directory the caller named).
  rm -f "$dir"/{authorized_keys,hosts,hosts.new,known_hosts,known_hosts.new,ssh,ssh_config,state} \
    "$dir"/{id_ed25519,ssh_host_ed25519_key}{,.pub} "$dir"/log/sshd.*.log
  rmdir "$dir/log" "$dir" 2>/dev/null || true
  echo "netns_cluster.sh: down"
}

up() {
  local n=$1 rate=$2 delay=$3 i host_ip
  mkdir -p "$dir"
  exec 9>"$dir.lock"
  flock -x 9
  if [[ -n $delay ]] && ! netem_available; then
    cannot_run "--delay needs the kernel's netem qdisc (CONFIG_NET_SCH_NETEM), which this kernel lacks"
  fi
  # A failed `up` that started the cluster leaves nothing half made.
  created=0
  ns_exists "$switch" || created=1
  trap 'rc=$?; if (( rc != 0 && created )); then echo "netns_cluster.sh: up failed; removing the cluster" >&2; down >/dev/null 2>&1 || true; fi' EXIT
  write_ssh_files
  if ! ns_exists "$switch"; then
    ip netns add "$switch" 2>/dev/null || cannot_run "cannot create network namespaces (ip netns add failed)"
    ip -n "$switch" link set lo up
    ip -n "$switch" link add br0 type bridge
    ip -n "$switch" addr add "$login_address/24" dev br0
    ip -n "$switch" link set br0 up
  fi
  # Hosts beyond N from an earlier, larger `up` go.
  for i in $(existing_hosts); do (( i < n )) || remove_host "$i"; done
  : >"$dir/hosts.new"
  : >"$dir/known_hosts.new"
  for ((i = 0; i < n; i++)); do
    host_ip=$(address "$i")
    if ! ns_exists "$prefix-$i"; then
      ip netns add "$prefix-$i"
      ip -n "$prefix-$i" link set lo up
      ip -n "$switch" link add "h$i" type veth peer name eth0 netns "$prefix-$i"
      ip -n "$switch" link set "h$i" master br0 up
      ip -n "$prefix-$i" addr add "$host_ip/24" dev eth0
      ip -n "$prefix-$i" link set eth0 up
    fi
    shape "$prefix-$i" eth0 "$rate" "$delay"  # what host i sends
    shape "$switch" "h$i" "$rate" "$delay"    # what host i receives
    start_sshd "$i"
    echo "$host_ip" >>"$dir/hosts.new"
    echo "$host_ip $(cut -d' ' -f1,2 "$dir/ssh_host_ed25519_key.pub")" >>"$dir/known_hosts.new"
  done
  mv "$dir/hosts.new" "$dir/hosts"
  mv "$dir/known_hosts.new" "$dir/known_hosts"
  printf 'n=%s\nrate=%s\ndelay=%s\n' "$n" "$rate" "$delay" >"$dir/state"
  # Every host answers over ssh from the login host before `up` returns.
  for ((i = 0; i < n; i++)); do
    host_ip=$(address "$i")
    local deadline=$((SECONDS + 20))
    until "$dir/ssh" "$host_ip" true 2>/dev/null; do
      (( SECONDS < deadline )) || { echo "error: ssh to host $i ($host_ip) fails; see $dir/log/sshd.$i.log" >&2; exit 1; }
      sleep 0.2
    done
  done
  echo "netns_cluster.sh: $n hosts up (namespaces $prefix-0..$prefix-$((n - 1)), $(address 0)..$(address $((n - 1))), rate ${rate:-unshaped}, delay ${delay:-none})"
  echo "  hosts file: $dir/hosts   ssh: $dir/ssh HOST   run in host I: ip netns exec $prefix-I CMD"
  echo "  launch: SSH=$dir/ssh launch/ssh.sh $dir/hosts --flagfile=... --model_dir=..."
}

status() {
  local i pid hosts up=1
  hosts=$(existing_hosts)
  if ! ns_exists "$switch" || [[ -z $hosts || ! -r $dir/state ]]; then
    echo "netns_cluster.sh: not up (prefix $prefix)"
    return 1
  fi
  # shellcheck disable=SC1091
  source "$dir/state"
  echo "prefix=$prefix dir=$dir n=$n rate=${rate:-unshaped} delay=${delay:-none}"
  for i in $hosts; do
    pid=$(alive_pid "$dir/sshd.$i.pid" || true)
    [[ -n $pid ]] || up=0
    printf '%s-%s %s sshd=%s qdisc=%s\n' "$prefix" "$i" "$(address "$i")" "${pid:-down}" \
      "$(ip netns exec "$prefix-$i" tc qdisc show dev eth0 | head -n 1 | cut -d' ' -f2)"
  done
  (( up )) || { echo "netns_cluster.sh: an sshd is not running; run up again"; return 1; }
}

command=${1:-}
case $command in
  -h|--help) usage; exit 0 ;;
  up)
    shift
    n=${1:-}
    [[ $n =~ ^[0-9]+$ ]] && (( n >= 1 && n <= 253 )) || die "up N: N='$n': expected a number of hosts in 1..253"
    shift
    rate="" delay=""
    while (( $# > 0 )); do
      case $1 in
        --rate=*) rate=${1#--rate=} ;;
        --rate) (( $# > 1 )) || die "--rate needs a value"; rate=$2; shift ;;
        --delay=*) delay=${1#--delay=} ;;
        --delay) (( $# > 1 )) || die "--delay needs a value"; delay=$2; shift ;;
        *) die "unknown argument '$1' (see -h)" ;;
      esac
      shift
    done
    [[ -z $rate || $rate =~ ^[0-9]+(\.[0-9]+)?(bit|kbit|mbit|gbit)$ ]] || die "--rate='$rate': expected a rate like 100mbit or 1gbit"
    [[ -z $delay || $delay =~ ^[0-9]+(\.[0-9]+)?(us|ms|s)$ ]] || die "--delay='$delay': expected a delay like 500us or 2ms"
    check_environment
    up "$n" "$rate" "$delay"
    ;;
  down)
    (( $# == 1 )) || die "down takes no arguments"
    (( EUID == 0 )) || cannot_run "network namespaces need root"
    mkdir -p "$dir"
    exec 9>"$dir.lock"
    flock -x 9
    down
    ;;
  install)
    (( $# == 1 )) || die "install takes no arguments"
    check_environment
    ;;
  status)
    (( $# == 1 )) || die "status takes no arguments"
    (( EUID == 0 )) || cannot_run "network namespaces need root"
    status
    ;;
  *) die "expected up N, down, status or install, got '${command}' (see -h)" ;;
esac
