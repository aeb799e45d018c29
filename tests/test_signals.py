"""Stop signals on the command line: SIGTERM before anything is written exits at once (75, nothing
left); SIGTERM mid-call stops at the next step inside a long multi-step call (75, checkpoint);
Ctrl-C stops the same way with exit 130; a second Ctrl-C exits at once. One stderr line each."""
import os
import signal
import subprocess
import sys
import time

import tensorflow as tf

from helpers import ROOT

# One tf.function call would run 10**6 steps (minutes): only an in-call stop check ends it early.
RUN = ["--hidden_dim=16", "--depth=1", "--kernel_size=3", "--patch_size=2", "--image_size=8",
       "--num_classes=4", "--synthetic_train_size=256", "--synthetic_test_size=32",
       "--global_batch_size=32", "--train_steps=1000000", "--steps_per_loop=1000000",
       "--checkpoint_every_steps=1000000", "--log_every_steps=1000000"]


def _start(model_dir):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TF_CONFIG", None)
    return subprocess.Popen([sys.executable, "-m", "convmixer_dist.main", *RUN, f"--model_dir={model_dir}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _signals_blocked(pid: int) -> bool:
    """True once the process has blocked SIGTERM (its signal thread is installed)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            blocked = next(int(line.split()[1], 16) for line in f if line.startswith("SigBlk:"))
    except (OSError, StopIteration):
        return False
    return bool(blocked & (1 << (signal.SIGTERM - 1)))


def _wait_for_line(proc, marker, timeout=180):
    deadline = time.time() + timeout
    for line in proc.stdout:
        if marker in line:
            return
        assert time.time() < deadline, f"no {marker!r} line"
    raise AssertionError(f"exited before {marker!r}: {proc.stderr.read()[-2000:]}")


def _latest_step(model_dir):
    return int(tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")).rsplit("-", 1)[1])


def test_stop_signals_in_every_phase(tmp_path):
    model_dir = str(tmp_path / "run")

    # 1. SIGTERM while starting (imports, strategy, data): exit 75 at once, nothing written.
    proc = _start(model_dir)
    deadline = time.time() + 60
    while not _signals_blocked(proc.pid):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert err.strip().splitlines() == ["preempted: stopped by SIGTERM before training started; "
                                        "nothing was written"]
    assert not os.path.exists(model_dir)

    # 2. SIGTERM in the middle of a 10**6-step call: stops at the next step, checkpoint, exit 75.
    proc = _start(model_dir)
    _wait_for_line(proc, "parameters;")  # the run header: the loop starts right after it
    time.sleep(3)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    stopped_in = time.time() - sent
    assert proc.returncode == 75, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("preempted: stopped by signal at step "), err
    first = _latest_step(model_dir)
    assert 0 <= first < 1000000 and f"at step {first};" in lines[0]
    assert stopped_in < 60, stopped_in  # a step (ms here) + the save, not the rest of the call
    assert not os.path.exists(os.path.join(model_dir, ".lock"))

    # 3. Ctrl-C: the same clean stop (checkpoint at the next step), exit 130, one line.
    proc = _start(model_dir)
    _wait_for_line(proc, "Resumed from")
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted: stopped by signal at step "), err
    assert "Traceback" not in err and _latest_step(model_dir) >= first

    # 4. Ctrl-C twice: the second exits at once, the checkpoints stay, the lock is released.
    before = sorted(os.listdir(os.path.join(model_dir, "checkpoints")))
    proc = _start(model_dir)
    _wait_for_line(proc, "Resumed from")
    proc.send_signal(signal.SIGINT)  # while the loop is still being traced (seconds) ...
    time.sleep(0.3)  # (two signals sent back to back would merge into one)
    proc.send_signal(signal.SIGINT)  # ... the second one does not wait for the step
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted again: exiting now"), err
    assert "Traceback" not in err
    after = sorted(os.listdir(os.path.join(model_dir, "checkpoints")))
    assert set(before) <= set(after)
    assert not os.path.exists(os.path.join(model_dir, ".lock"))


def test_sigterm_to_one_worker_stops_both_at_the_same_step_inside_the_call(tmp_path):
    # The stop flag is all-reduced inside the loop: worker 1 alone receives SIGTERM, both workers
    # leave a 10**6-step call at the same step, save together and exit 75.
    model_dir = tmp_path / "mw"
    tiny = [a for a in RUN if not a.startswith("--global_batch_size")] + [
        "--global_batch_size=16", "--collective_timeout=60"]
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("TF_CONFIG", None)
    proc = subprocess.Popen(["bash", "launch/local.sh", "2", f"--model_dir={model_dir}", *tiny],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for_line(proc, "parameters;")  # the chief's run header, shown live by the launcher
        time.sleep(3)
        worker1 = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace")
                environ = open(f"/proc/{entry}/environ", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if "convmixer_dist.main" in cmdline and str(model_dir) in cmdline and '"index": 1}' in environ:
                worker1.append(int(entry))
        assert len(worker1) == 1
        os.kill(worker1[0], signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75
    logs = [(model_dir / "logs" / f"worker-{i}.log").read_text() for i in (0, 1)]
    stops = [[line for line in log.splitlines() if line.startswith("preempted: stopped by signal at step ")]
             for log in logs]
    assert all(len(s) == 1 for s in stops), logs
    steps = [int(s[0].split("at step ")[1].split(";")[0]) for s in stops]
    assert steps[0] == steps[1] < 1000000 and _latest_step(str(model_dir)) == steps[0]
