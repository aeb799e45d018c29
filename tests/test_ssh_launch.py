"""launch/ssh.sh over real ssh into two hosts of the test bed (launch/testing/netns_cluster.sh).

Each worker runs in its own network namespace with its own address, so the collectives cross a
real (virtual) network between two hosts, not loopback; ssh is OpenSSH with the bed's generated keys.
Needs root (CI runs as root).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, run_cli
from netns import netns_cluster

# The quickstart (configs/quickstart.flags) at test size: same data, schedule and optimizer settings.
# (A later flag wins over the flagfile's, so --model_dir comes after this.)
QUICKSTART_TINY = ["--flagfile=configs/quickstart.flags", "--hidden_dim=16", "--depth=1", "--kernel_size=3",
                   "--patch_size=2", "--image_size=8", "--global_batch_size=16", "--steps_per_loop=3",
                   "--synthetic_train_size=128", "--synthetic_test_size=40", "--num_classes=4",
                   "--sync_bn", "--seed=5"]


@pytest.fixture(scope="module")
def cluster():
    """Two hosts up for this module's tests, down afterwards (also when a test fails)."""
    with netns_cluster(2, tag="ss") as bed:
        yield bed


def _launch_env(cluster, log_dir) -> dict:
    # The remote login shell starts from sshd's environment: name this interpreter and checkout.
    return dict(os.environ, SSH=cluster.ssh, REMOTE_PYTHON=sys.executable, REMOTE_DIR=ROOT,
                LOG_DIR=str(log_dir))


def _workers_in(cluster, index: int, model_dir) -> list[int]:
    """Training processes of `model_dir` running in host `index`'s namespace."""
    listed = subprocess.run(["ip", "netns", "pids", cluster.namespace(index)], capture_output=True,
                            text=True).stdout.split()
    found = []
    for pid in listed:
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").split("\0")
        except OSError:
            continue
        # The interpreter itself, not the remote shell (and its subshell) that started it.
        if argv[1:3] == ["-m", "convmixer_dist.main"] and f"--model_dir={model_dir}" in argv:
            found.append(int(pid))
    return found


def test_two_hosts_over_ssh_train_like_two_mirrored_replicas(cluster, tmp_path):
    model_dir = tmp_path / "mw"
    result = subprocess.run(["bash", "launch/ssh.sh", cluster.hosts_file, *QUICKSTART_TINY,
                             f"--model_dir={model_dir}", "--train_steps=6", "--collective_timeout=30"],
                            cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env=_launch_env(cluster, tmp_path / "logs"))
    logs = [(tmp_path / "logs" / f"worker-{i}.log").read_text() for i in (0, 1)]
    assert result.returncode == 0, result.stderr[-2000:] + logs[0][-2000:] + logs[1][-2000:]
    # Each worker ran on its host: the cluster named the hosts' addresses, not localhost.
    assert "198.18.0.1:2222" in result.stdout and "198.18.0.2:2222" in result.stdout
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["num_replicas"] == 2 and summary["strategy"] == "multi_worker"
    checksums = [re.findall(r"weights_sha256 (\w+) weights_abs_sum (\S+)", log)[0] for log in logs]
    assert checksums[0][0] == checksums[1][0]  # both hosts hold the same weights, bit for bit

    # The same global batches on one process with 2 mirrored replicas: the same weights to float32
    # reduction-order noise (relative 1e-6 on the sum of |w|, as tests/test_multi_worker.py).
    mirrored = run_cli("convmixer_dist.main", "--strategy=mirrored", "--cpu_replicas=2", *QUICKSTART_TINY,
                       "--train_steps=6", f"--model_dir={tmp_path / 'mirrored'}")
    assert mirrored.returncode == 0, mirrored.stderr[-2000:]
    reference = json.loads((tmp_path / "mirrored" / "summary.json").read_text())
    abs_sum = float(checksums[0][1])
    assert abs(reference["weights_abs_sum"] - abs_sum) <= 1e-6 * abs(abs_sum)
    assert abs(reference["weights_abs_sum"] - summary["weights_abs_sum"]) <= 1e-6 * abs(abs_sum)


def test_killing_one_hosts_worker_stops_the_run_on_every_host(cluster, tmp_path):
    model_dir = tmp_path / "mw"
    proc = subprocess.Popen(["bash", "launch/ssh.sh", cluster.hosts_file, *QUICKSTART_TINY,
                             f"--model_dir={model_dir}", "--train_steps=100000", "--checkpoint_every_steps=6",
                             "--log_every_steps=3", "--collective_timeout=20"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=_launch_env(cluster, tmp_path / "logs"))
    try:
        deadline = time.time() + 150
        while not (model_dir / "checkpoints" / "ckpt-6.index").exists():
            assert time.time() < deadline and proc.poll() is None, "training did not reach step 6"
            time.sleep(0.2)
        victims = _workers_in(cluster, 1, model_dir)
        assert len(victims) == 1, f"worker of host 1 not found: {victims}"
        assert len(_workers_in(cluster, 0, model_dir)) == 1
        killed_at = time.time()
        os.kill(victims[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        took = time.time() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert took < 60, f"the launcher needed {took:.0f} s to notice"
    assert "worker 1 on 198.18.0.2" in err and "failed" in err
    # Nothing left running on either host: the survivor was stopped through its ssh session.
    deadline = time.time() + 30
    while _workers_in(cluster, 0, model_dir) or _workers_in(cluster, 1, model_dir):
        assert time.time() < deadline, "a worker outlived the launcher"
        time.sleep(0.2)
    # The checkpoint written before the kill is intact (a rerun would resume from it).
    assert (model_dir / "checkpoints" / "ckpt-6.index").exists()
