"""Bounded, interruptible multi-worker start-up (--startup_timeout, startup.py), with real workers:
a peer that never starts, SIGTERM while waiting for peers, and SIGTERM or the deadline while
TensorFlow creates the strategy (the phase where it blocks holding the interpreter and installs its
own SIGTERM handler). The peer in the last two is this test process speaking the start-up protocol."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

from helpers import ROOT, free_ports, make_tf_config

from convmixer_dist import cluster, startup

TINY = ["--strategy=multi_worker", "--hidden_dim=16", "--depth=1", "--kernel_size=3", "--patch_size=2",
        "--image_size=8", "--global_batch_size=16", "--train_steps=3", "--steps_per_loop=3",
        "--synthetic_train_size=64", "--synthetic_test_size=16"]


def _start_worker(tmp_path, addresses, *flags):
    """Worker 0 of `addresses`, started through the real CLI; returns (process, addresses)."""
    env = dict(os.environ, TF_CONFIG=make_tf_config(addresses, 0))
    return subprocess.Popen([sys.executable, "-m", "convmixer_dist.main", *TINY,
                             f"--model_dir={tmp_path / 'run'}", *flags], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_line(proc, text, timeout=120):
    """Read the worker's stdout until a line contains `text`; returns the time it was seen."""
    found = threading.Event()

    def reader():
        for line in proc.stdout:
            if text in line:
                found.set()
    threading.Thread(target=reader, daemon=True).start()
    assert found.wait(timeout), f"the worker never printed {text!r}"
    return time.monotonic()


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith(("error:", "preempted:"))]


def _fake_peer(addresses, stop):
    """Task 1 of `addresses`: completes the start-up handshake with task 0, then never joins."""
    token = startup._token(addresses)  # noqa: SLF001 - the protocol under test
    listener = startup.listen(addresses[1])
    said = heard = False
    while not (said and heard) and not stop.is_set():
        said = said or startup.hello(addresses[0], token, 1)
        heard = heard or startup._read_hello(listener, token) == 0  # noqa: SLF001
        time.sleep(0.05)
    listener.close()


def test_a_peer_that_never_starts_ends_start_up_within_the_bound(tmp_path):
    addresses = [f"localhost:{p}" for p in free_ports(2)]
    proc = _start_worker(tmp_path, addresses, "--startup_timeout=3")
    waiting_since = _wait_for_line(proc, "waiting for its peers")
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - waiting_since
    assert proc.returncode == startup.EXIT_STARTUP_FAILED
    assert 3 <= took < 8, took
    lines = _error_lines(err)
    assert len(lines) == 1 and "--startup_timeout=3s" in lines[0]
    assert f"worker 1 ({addresses[1]})" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sigterm_while_waiting_for_peers_stops_the_worker_at_once(tmp_path):
    addresses = [f"localhost:{p}" for p in free_ports(2)]
    proc = _start_worker(tmp_path, addresses, "--startup_timeout=300")
    _wait_for_line(proc, "waiting for its peers")
    # Every thread of the worker holds SIGTERM pending (a thread started before the mask, e.g.
    # numpy's BLAS pool at the flags' import, would take it to its default action: killed, -15).
    for task in os.listdir(f"/proc/{proc.pid}/task"):
        status = open(f"/proc/{proc.pid}/task/{task}/status").read()
        blocked = int(re.search(r"^SigBlk:\s*([0-9a-f]+)", status, re.M).group(1), 16)
        assert blocked & (1 << (signal.SIGTERM - 1)), f"thread {task} does not block SIGTERM"
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10  # seconds (interpreter exit under load), not the 300 s bound
    assert proc.returncode == startup.EXIT_PREEMPTED  # nothing trained yet: a rerun starts over
    assert _error_lines(err) == ["preempted: SIGTERM during multi-worker start-up (waiting for peers); "
                                 "nothing to save, rerun the same command to resume"]


def _stuck_in_creation(tmp_path, timeout):
    """Worker 0 whose peer said hello but never joins: TensorFlow's strategy creation blocks."""
    addresses = [f"localhost:{p}" for p in free_ports(2)]
    stop = threading.Event()
    peer = threading.Thread(target=_fake_peer, args=(addresses, stop), daemon=True)
    peer.start()
    proc = _start_worker(tmp_path, addresses, f"--startup_timeout={timeout}")
    _wait_for_line(proc, "waiting for its peers")
    peer.join(60)
    stop.set()
    return proc, addresses


def test_sigterm_while_tensorflow_creates_the_strategy_stops_the_worker(tmp_path):
    proc, _ = _stuck_in_creation(tmp_path, timeout=300)
    time.sleep(3)  # Well inside MultiWorkerMirroredStrategy's creation, TensorFlow's handler installed.
    assert proc.poll() is None
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10  # seconds (interpreter exit under load), not the 300 s bound
    assert proc.returncode == -signal.SIGKILL  # stopped by the watchdog process
    lines = _error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("preempted: SIGTERM during multi-worker start-up "
                                                   "(creating the strategy)")


def test_strategy_creation_that_never_finishes_is_bounded(tmp_path):
    proc, addresses = _stuck_in_creation(tmp_path, timeout=6)
    started = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - started < 10
    assert proc.returncode == -signal.SIGKILL
    lines = _error_lines(err)
    assert len(lines) == 1 and "did not finish creating the strategy within --startup_timeout" in lines[0]
    assert f"worker 1 ({addresses[1]})" in lines[0]  # the peer stopped listening: named unreachable


def test_tasks_of_a_tf_config_put_the_chief_first():
    spec = json.loads(json.dumps({"cluster": {"worker": ["w0:1", "w1:2"], "chief": ["c:3"]},
                                  "task": {"type": "worker", "index": 1}}))
    assert cluster.tasks(spec) == (["chief 0", "worker 0", "worker 1"], ["c:3", "w0:1", "w1:2"], 2)


def test_launcher_stop_during_start_up_takes_seconds(tmp_path):
    # launch/local.sh with worker 1 never starting (a stub that sleeps): worker 0 waits for its peer;
    # SIGTERM to the launcher (as Ctrl-C, a scheduler or `timeout` would send) stops everything.
    stub = tmp_path / "python"
    stub.write_text(f"#!/usr/bin/env bash\ncase $TF_CONFIG in *'\"index\": 1}}'*) exec sleep 120;; esac\n"
                    f'exec {sys.executable} "$@"\n')
    stub.chmod(0o755)
    model_dir = tmp_path / "run"
    proc = subprocess.Popen(["bash", "launch/local.sh", "2", f"--model_dir={model_dir}", *TINY[1:],
                             "--startup_timeout=300"], cwd=ROOT, env=dict(os.environ, PYTHON=str(stub)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_line(proc, "waiting for its peers")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert time.monotonic() - sent < 10
    assert proc.returncode == 130
    log = (model_dir / "logs" / "worker-0.log").read_text()
    assert "preempted: SIGTERM during multi-worker start-up (waiting for peers)" in log
