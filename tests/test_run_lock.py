"""MODEL_DIR/.lock holding anything but a lock this program writes: one clear rule (refused with
one line naming the file and why, never taken over, never a traceback), whatever the content."""
import json
import os
import socket

import pytest

from convmixer_dist import rundir
from convmixer_dist.errors import UsageError

HOST = socket.gethostname()


def _fifo(path):
    os.mkfifo(path)


def _directory(path):
    os.mkdir(path)


def _dangling_link(path):
    os.symlink("/nonexistent/lock", path)


@pytest.mark.parametrize("content,why", [
    (json.dumps({"pid": 99999999999, "host": HOST}), "pid 99999999999 is not a process id"),
    (json.dumps({"pid": 10 ** 400, "host": HOST}), "is not a process id"),
    (json.dumps({"pid": -1, "host": HOST}), "pid -1 is not a process id"),  # kill(-1) = every process
    (json.dumps({"pid": 0, "host": HOST}), "pid 0 is not a process id"),    # kill(0) = own group
    (json.dumps({"pid": "123", "host": HOST}), "pid 123 is not a process id"),
    (json.dumps({"pid": True, "host": HOST}), "pid True is not a process id"),
    (json.dumps({"pid": 1.5, "host": HOST}), "pid 1.5 is not a process id"),
    (json.dumps({"pid": 4242}), "no host name"),
    (json.dumps({"pid": 4242, "host": ["a"]}), "no host name"),
    (json.dumps({"pid": 4242, "host": HOST, "start": 7}), "start or since is not a string"),
    (json.dumps([4242, HOST]), "not a JSON object"),
    ("", "empty"),
    ("{not json", "not JSON"),
    (b"\xff\xfe\x00garbage", "not JSON"),
    ("[" * 100000, "larger than 4096 bytes"),
    ("[" * 4000, "not JSON"),  # nested deeper than Python's recursion limit
    (_fifo, "not a regular file"),  # opening a FIFO must not block
    (_directory, "not a regular file"),
    (_dangling_link, "a symbolic link"),
])
def test_anything_but_a_lock_is_refused_in_one_line_and_left_alone(tmp_path, content, why):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    lock = model_dir / rundir.LOCK_FILE
    if callable(content):
        content(str(lock))
    elif isinstance(content, bytes):
        lock.write_bytes(content)
    else:
        lock.write_text(content)
    before = os.lstat(lock)
    with pytest.raises(UsageError) as err:
        rundir.acquire_run_lock(str(model_dir))
    message = str(err.value)
    assert message == (f"--model_dir={model_dir}: {lock} is not a run lock ({why}); delete it if no run "
                       "uses this directory") or (why in message and message.endswith("uses this directory"))
    assert "\n" not in message
    assert os.lstat(lock).st_mtime_ns == before.st_mtime_ns and os.path.lexists(lock)  # not taken over
    assert sorted(os.listdir(model_dir)) == [rundir.LOCK_FILE]  # no temporary file left


def test_an_absurd_pid_through_the_cli_is_one_error_line(tmp_path):
    from helpers import run_cli

    model_dir = tmp_path / "run"
    model_dir.mkdir()
    (model_dir / ".lock").write_text(json.dumps({"pid": 99999999999, "host": HOST}))
    result = run_cli("convmixer_dist.main", "--flagfile=configs/quickstart.flags", "--train_steps=2",
                     f"--model_dir={model_dir}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"error: --model_dir={model_dir}: {model_dir}/.lock is not a run lock (pid 99999999999 is not "
        "a process id); delete it if no run uses this directory"]
    assert sorted(os.listdir(model_dir)) == [".lock"]


def test_a_valid_stale_lock_is_still_taken_over_and_released(tmp_path):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    (model_dir / ".lock").write_text(json.dumps({"pid": rundir.PID_MAX, "host": HOST, "since": "x"}))
    if os.path.exists(f"/proc/{rundir.PID_MAX}"):
        pytest.skip("a process has the largest pid")
    rundir.acquire_run_lock(str(model_dir))
    assert json.loads((model_dir / ".lock").read_text())["pid"] == os.getpid()
    rundir.release_run_lock(str(model_dir))
    assert not (model_dir / ".lock").exists()
