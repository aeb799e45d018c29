"""launch/testing/netns_cluster.sh: namespaces as hosts, shaped links, real sshd, clean removal."""
import os
import subprocess
import sys

from netns import SCRIPT, netns_cluster, script, unique_prefix

# Receives on HOST:5001 and prints "bytes seconds" once the sender closes.
RECEIVER = """
import socket, sys, time
s = socket.create_server((sys.argv[1], 5001))
c, _ = s.accept(); n = 0; start = time.perf_counter()
while (data := c.recv(1 << 20)):
    n += len(data)
print(n, time.perf_counter() - start)
"""
SENDER = """
import socket, sys, time
for _ in range(100):
    try:
        c = socket.create_connection((sys.argv[1], 5001)); break
    except OSError:
        time.sleep(0.05)
c.sendall(b"x" * int(sys.argv[2])); c.close()
"""


def _in(namespace, *command, **kwargs):
    return subprocess.run(["ip", "netns", "exec", namespace, *command], capture_output=True, text=True,
                          timeout=60, **kwargs)


def _throughput_mbit(cluster, size):
    """Mbit/s from host 0 to host 1 over their links."""
    receiver = subprocess.Popen(["ip", "netns", "exec", cluster.namespace(1), sys.executable, "-c", RECEIVER,
                                 cluster.hosts[1]], stdout=subprocess.PIPE, text=True)
    sent = _in(cluster.namespace(0), sys.executable, "-c", SENDER, cluster.hosts[1], str(size))
    assert sent.returncode == 0, sent.stderr
    received, seconds = receiver.communicate(timeout=60)[0].split()
    assert int(received) == size
    return size * 8 / float(seconds) / 1e6


def test_up_gives_hosts_with_addresses_sshd_and_a_shaped_link():
    with netns_cluster(2, "--rate=40mbit") as cluster:
        assert cluster.hosts == ["198.18.0.1", "198.18.0.2"]
        status = script("status", prefix=cluster.prefix)
        assert status.returncode == 0 and "rate=40mbit" in status.stdout
        # Real ssh (key from the generated pair, host key checked) lands in each host's namespace.
        for host in cluster.hosts:
            seen = subprocess.run([cluster.ssh, host, "ip -4 -o addr show dev eth0"], capture_output=True,
                                  text=True, timeout=30)
            assert seen.returncode == 0, seen.stderr
            assert f"inet {host}/24" in seen.stdout
        # 4 MB at 40 Mbit/s: about 0.8 s; tbf lets a 64 KiB burst through, so allow a little above.
        assert 30 < _throughput_mbit(cluster, 4_000_000) < 44

        # `up` again is idempotent and reshapes in place: a third host, the links unshaped.
        sshd_pid = open(os.path.join(cluster.dir, "sshd.0.pid")).read()
        again = script("up", "3", prefix=cluster.prefix)
        assert again.returncode == 0, again.stderr
        assert open(os.path.join(cluster.dir, "sshd.0.pid")).read() == sshd_pid
        assert open(cluster.hosts_file).read().split() == ["198.18.0.1", "198.18.0.2", "198.18.0.3"]
        assert _throughput_mbit(cluster, 40_000_000) > 200
        # Nothing of ours in this machine's own namespace: no address of the test range, no link.
        own = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        assert "198.18." not in own
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert cluster.prefix not in left and not os.path.exists(cluster.dir)
    assert script("status", prefix=cluster.prefix).returncode == 1


def test_delay_is_applied_or_refused_with_exit_77():
    # netem is a kernel option (CONFIG_NET_SCH_NETEM); where it is missing, --delay cannot run here.
    prefix = unique_prefix("dl")
    try:
        result = script("up", "2", "--rate=1gbit", "--delay=20ms", prefix=prefix)
        if result.returncode == 0:
            ping = _in(f"{prefix}-0", sys.executable, "-c", "import socket, time; t = time.perf_counter();"
                       "socket.create_connection(('198.18.0.2', 22)).close(); print(time.perf_counter() - t)")
            assert float(ping.stdout) >= 0.040  # a TCP connect is one round trip: 2 x 20 ms
        else:
            assert result.returncode == 77
            assert result.stderr.strip().splitlines() == [
                "netns_cluster.sh: cannot run here: --delay needs the kernel's netem qdisc "
                "(CONFIG_NET_SCH_NETEM), which this kernel lacks"]
            assert not os.path.exists(f"/run/netns/{prefix}-sw")  # nothing left behind
    finally:
        script("down", prefix=prefix)


def test_not_root_is_exit_77_with_one_line():
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", SCRIPT,
                             "up", "2"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 77
    assert result.stderr.strip() == "netns_cluster.sh: cannot run here: network namespaces need root"


def test_usage_and_bad_arguments():
    assert script("-h", prefix="cmdtb").stdout.startswith("usage:")
    for args, named in [(["up", "0"], "N='0'"), (["up", "2", "--rate=fast"], "--rate='fast'"),
                        (["up", "2", "--delay=2"], "--delay='2'"), (["up", "2", "--mtu=9000"], "'--mtu=9000'"),
                        (["sideways"], "'sideways'")]:
        result = script(*args, prefix="cmdtb")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and named in lines[0]
    bad_prefix = subprocess.run(["bash", SCRIPT, "status"], env=dict(os.environ, NETNS_CLUSTER_PREFIX="Bad-1"),
                                capture_output=True, text=True)
    assert bad_prefix.returncode == 2 and "NETNS_CLUSTER_PREFIX='Bad-1'" in bad_prefix.stderr
