"""The model directory: run identity stored with the checkpoints, the run lock, --overwrite.
In-process and fast (no training: the directory logic runs before any TensorFlow op)."""
import json
import os
import socket
import subprocess
import sys

import pytest

from convmixer_dist import rundir
from convmixer_dist.errors import UsageError
from helpers import tiny_config


def _prepared(model_dir, **overrides):
    config = tiny_config(str(model_dir), **overrides)
    rundir.prepare_model_dir(config, chief=True)
    rundir.release_run_lock(config.model_dir)
    (model_dir / "checkpoints" / "ckpt-0.index").write_bytes(b"x")  # as the first save would
    return config


@pytest.mark.parametrize("flags_damage", ["deleted", "line deleted", "edited"])
def test_identity_is_kept_with_the_checkpoints_and_flags_txt_never_disagrees(tmp_path, flags_damage):
    model_dir = tmp_path / "run"
    _prepared(model_dir, hidden_dim=16)
    identity = json.loads((model_dir / rundir.IDENTITY_FILE).read_text())
    assert identity["hidden_dim"] == "16" and identity["dataset"] == "synthetic"
    flags_txt = model_dir / "flags.txt"
    if flags_damage == "deleted":
        flags_txt.unlink()
    elif flags_damage == "line deleted":
        flags_txt.write_text("".join(l for l in flags_txt.read_text().splitlines(True)
                                     if not l.startswith("--hidden_dim")))
    else:
        flags_txt.write_text(flags_txt.read_text().replace("--hidden_dim=16", "--hidden_dim=32"))
    damaged = flags_txt.read_text() if flags_txt.exists() else None
    with pytest.raises(UsageError, match=r"\(identity.json\): --hidden_dim=32 \(was 16\)"):
        rundir.prepare_model_dir(tiny_config(str(model_dir), hidden_dim=32), chief=True)
    assert (flags_txt.read_text() if flags_txt.exists() else None) == damaged  # not rewritten
    rundir.release_run_lock(str(model_dir))
    # The right command still resumes, and flags.txt again says what the checkpoints are.
    rundir.prepare_model_dir(tiny_config(str(model_dir), hidden_dim=16), chief=True)
    rundir.release_run_lock(str(model_dir))
    assert "--hidden_dim=16" in flags_txt.read_text()
    assert json.loads((model_dir / rundir.IDENTITY_FILE).read_text()) == identity  # written once


def test_checkpoints_of_unknown_identity_are_not_resumed(tmp_path):
    model_dir = tmp_path / "run"
    _prepared(model_dir)
    (model_dir / rundir.IDENTITY_FILE).unlink()
    (model_dir / "flags.txt").unlink()
    with pytest.raises(UsageError, match="holds checkpoints but neither"):
        rundir.prepare_model_dir(tiny_config(str(model_dir)), chief=True)
    assert sorted(os.listdir(model_dir)) == ["checkpoints"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(model_dir, pid, host=None):
    os.makedirs(model_dir, exist_ok=True)
    (model_dir / rundir.LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                          "since": "earlier"}))


def test_a_run_directory_in_use_is_refused_naming_the_process(tmp_path):
    model_dir = tmp_path / "run"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(model_dir, other.pid)
        with pytest.raises(UsageError, match=rf"is in use by pid {other.pid} on {socket.gethostname()} "):
            rundir.prepare_model_dir(tiny_config(str(model_dir)), chief=True)
        assert sorted(os.listdir(model_dir)) == [rundir.LOCK_FILE]  # nothing written
        # Non-chief workers of a multi-worker run share the chief's directory: never refused.
        rundir.prepare_model_dir(tiny_config(str(model_dir)), chief=False)
    finally:
        other.kill()
        other.wait()


def test_a_lock_from_another_host_is_refused_and_a_dead_process_lock_is_stale(tmp_path):
    model_dir = tmp_path / "run"
    _write_lock(model_dir, os.getpid(), host="elsewhere.example")
    with pytest.raises(UsageError, match=rf"in use by pid {os.getpid()} on elsewhere.example.*delete"):
        rundir.acquire_run_lock(str(model_dir))
    _write_lock(model_dir, _dead_pid())
    rundir.acquire_run_lock(str(model_dir))  # the dead process's lock is taken over
    holder = json.loads((model_dir / rundir.LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    rundir.acquire_run_lock(str(model_dir))  # re-entrant within one process
    rundir.release_run_lock(str(model_dir))
    assert not (model_dir / rundir.LOCK_FILE).exists()


def test_overwrite_moves_the_run_aside_but_not_the_launchers_logs(tmp_path):
    model_dir = tmp_path / "run"
    _prepared(model_dir)
    (model_dir / "logs").mkdir()
    (model_dir / "logs" / "worker-0.log").write_text("started\n")
    with open(model_dir / "logs" / "worker-0.log", "a") as log:  # the launcher's open log file
        moved = rundir.prepare_model_dir(tiny_config(str(model_dir), overwrite=True), chief=True)
        log.write("still here\n")
    rundir.release_run_lock(str(model_dir))
    assert moved and os.path.isfile(os.path.join(moved, "checkpoints", "ckpt-0.index"))
    assert not os.path.exists(os.path.join(moved, "logs"))
    assert (model_dir / "logs" / "worker-0.log").read_text() == "started\nstill here\n"
    assert sorted(os.listdir(model_dir)) == ["checkpoints", "flags.txt", "logs"]


def test_writable_checks_refuse_directories_and_read_only_places(tmp_path):
    (tmp_path / "a_dir").mkdir()
    with pytest.raises(UsageError, match=r"^--output=X: .*a_dir is a directory"):
        rundir.ensure_writable_file(str(tmp_path / "a_dir"), "--output=X")
    # /sys refuses new files even to root (a chmod'ed directory would not stop root).
    with pytest.raises(UsageError, match=r"^--model_dir=/sys/kernel: /sys/kernel is not writable"):
        rundir.ensure_writable_dir("/sys/kernel", "--model_dir=/sys/kernel")
    rundir.ensure_writable_file(str(tmp_path / "new" / "out.json"), "--output=Y")
    assert os.listdir(tmp_path / "new") == []  # the probe leaves nothing behind


def test_overwrite_refuses_the_current_directory_and_puts_the_old_run_beside_the_directory(
        tmp_path, monkeypatch):
    model_dir = tmp_path / "run"
    _prepared(model_dir)
    (model_dir / "notes.txt").write_text("mine\n")
    monkeypatch.chdir(model_dir)
    for spelling in (".", "./", str(model_dir)):  # also a directory holding the current one
        with pytest.raises(UsageError, match=r"--overwrite: .* is the current directory or holds it"):
            rundir.prepare_model_dir(tiny_config(spelling, overwrite=True), chief=True)
        rundir.release_run_lock(spelling)
    assert sorted(os.listdir(model_dir)) == ["checkpoints", "flags.txt", "notes.txt"]  # nothing moved
    monkeypatch.chdir(tmp_path)
    moved = rundir.prepare_model_dir(tiny_config("run/", overwrite=True), chief=True)
    rundir.release_run_lock("run/")
    assert os.path.dirname(moved) == str(tmp_path) and os.path.basename(moved).startswith("run.old-")
    assert os.path.isfile(os.path.join(moved, "checkpoints", "ckpt-0.index"))


def test_a_stale_temp_checkpoint_is_removed_on_resume(tmp_path, capsys):
    model_dir = tmp_path / "run"
    _prepared(model_dir)
    temp = model_dir / "checkpoints" / "ckpt-3_temp"  # what a save killed half-way leaves
    temp.mkdir()
    (temp / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"\0" * 64)
    rundir.prepare_model_dir(tiny_config(str(model_dir)), chief=True)
    rundir.release_run_lock(str(model_dir))
    assert not temp.exists() and (model_dir / "checkpoints" / "ckpt-0.index").exists()
    assert f"removed {temp}: a save that never finished" in capsys.readouterr().out


def test_atomic_output_replaces_in_one_step_and_removes_its_temporary_on_failure(tmp_path):
    report = tmp_path / "report.json"
    rundir.write_json(str(report), {"accuracy": 0.5})
    with pytest.raises(OSError):  # e.g. the disk fills up half-way through the new content
        with rundir.atomic_output(str(report)) as tmp:
            with open(tmp, "w") as f:
                f.write('{"accura')
            raise OSError(28, "No space left on device", tmp)
    assert json.loads(report.read_text()) == {"accuracy": 0.5}  # the old, complete content
    assert sorted(os.listdir(tmp_path)) == ["report.json"]  # no temporary left behind
    with rundir.atomic_output(str(report)) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith(".tmp")
        assert os.path.basename(tmp).startswith(".")  # hidden: listings of outputs never see it
        with open(tmp, "w") as f:
            f.write("new")
        assert report.read_text() != "new"  # nothing changes until the block ends
    assert report.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["report.json"]
    export = tmp_path / "export"  # a directory output (a SavedModel) appears complete or not at all
    with rundir.atomic_output(str(export)) as tmp:
        os.makedirs(os.path.join(tmp, "variables"))
        (tmp_path / tmp / "variables" / "data").write_bytes(b"weights")
    assert (export / "variables" / "data").read_bytes() == b"weights"
    with pytest.raises(FileNotFoundError):  # a writer that wrote nothing is an error, not an empty file
        with rundir.atomic_output(str(tmp_path / "nothing.png")):
            pass
    assert not (tmp_path / "nothing.png").exists()
