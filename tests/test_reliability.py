"""Reliability: kill -9 and resume bit-identically, damaged checkpoints, SIGTERM, NaN policies,
resume safety. Runs the real CLI in subprocesses where a process has to die."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from convmixer_dist import strategy as strategy_lib
from convmixer_dist.training.loop import TrainingDiverged, train_and_evaluate
from convmixer_dist.errors import UsageError
from helpers import ROOT, run_cli, tiny_config

# Deterministic tiny run: 4 epochs x 8 steps, a progress line and a checkpoint every 2 steps.
RUN = ["--hidden_dim=16", "--depth=2", "--kernel_size=3", "--patch_size=2", "--image_size=8",
       "--num_classes=4", "--synthetic_train_size=256", "--synthetic_test_size=2000",
       "--global_batch_size=32", "--epochs=4", "--steps_per_loop=1", "--log_every_steps=1",
       "--checkpoint_every_steps=2", "--dropout_rate=0.1", "--deterministic", "--seed=3"]
NOT_REPRODUCIBLE = {"wall_seconds", "images_per_sec", "resumed_from"}


def _start(model_dir, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "convmixer_dist.main", *RUN,
                             f"--model_dir={model_dir}", *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_until(model_dir, marker, sig=signal.SIGKILL, timeout=120):
    """Start a run, send `sig` when a stdout line contains `marker`; return (exit code, output)."""
    proc = _start(model_dir)
    deadline = time.time() + timeout
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            proc.send_signal(sig)
            break
        assert time.time() < deadline, "marker never appeared:\n" + "".join(lines)
    rest, err = proc.communicate(timeout=timeout)
    return proc.returncode, "".join(lines) + rest, err


def _summary(model_dir):
    with open(os.path.join(model_dir, "summary.json")) as f:
        return {k: v for k, v in json.load(f).items() if k not in NOT_REPRODUCIBLE}


def test_kill_9_at_three_points_then_resume_is_bit_identical(tmp_path):
    reference = str(tmp_path / "reference")
    result = run_cli("convmixer_dist.main", *RUN, f"--model_dir={reference}")
    assert result.returncode == 0, result.stderr[-2000:]

    killed = str(tmp_path / "killed")
    # Mid-epoch (step 5 of epoch 1), just after an epoch's last step while it evaluates (step 16),
    # and mid-epoch again late in the run (step 27).
    for marker in ("step 5/32", "step 16/32", "step 27/32"):
        code, out, _ = _run_until(killed, marker)
        assert code == -signal.SIGKILL, out[-2000:]
    final = run_cli("convmixer_dist.main", *RUN, f"--model_dir={killed}")
    assert final.returncode == 0, final.stderr[-2000:]
    assert "Resumed from" in final.stdout

    expected, got = _summary(reference), _summary(killed)
    assert got["weights_sha256"] == expected["weights_sha256"]
    assert got == expected


def test_sigterm_saves_at_next_step_and_exits_75_then_resumes(tmp_path):
    model_dir = str(tmp_path / "run")
    code, out, err = _run_until(model_dir, "step 7/32", sig=signal.SIGTERM)
    assert code == 75, err[-2000:]
    assert "preempted" in err and "checkpoint saved" in err
    saved = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    step = int(saved.rsplit("-", 1)[1])
    assert 7 <= step <= 9  # at the next loop boundary after the signal, not a periodic checkpoint
    again = run_cli("convmixer_dist.main", *RUN, f"--model_dir={model_dir}")
    assert again.returncode == 0 and f"at step {step}/32" in again.stdout


def _in_process(config):
    return train_and_evaluate(config, strategy_lib.create_strategy(config))


def test_nan_stop_keeps_last_good_checkpoint(tmp_path, capsys):
    config = tiny_config(str(tmp_path), train_steps=12, fault_inject_nan_at_step=8)
    with pytest.raises(TrainingDiverged, match="between steps 7 and 8"):
        _in_process(config)
    latest = tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))
    assert latest.endswith("ckpt-6")
    reader = tf.train.load_checkpoint(latest)
    for key in reader.get_variable_to_shape_map():
        if key.startswith("model/"):
            assert np.all(np.isfinite(reader.get_tensor(key))), key


def test_nan_rollback_restores_and_lowers_learning_rate(tmp_path, capsys):
    config = tiny_config(str(tmp_path), train_steps=12, fault_inject_nan_at_step=8, nan_policy="rollback")
    summary = _in_process(config)
    assert summary["steps"] == 12 and summary["nan_rollbacks"] == 1
    assert summary["learning_rate_scale"] == 0.5
    assert "rolled back to" in capsys.readouterr().out


def _files(directory) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def _garbage_index(ckpt_dir):
    (ckpt_dir / "checkpoint").write_text("garbage\n")


def _empty_index(ckpt_dir):
    (ckpt_dir / "checkpoint").write_bytes(b"")


def _truncated_newest(ckpt_dir):
    # A crash between files: the newest checkpoint's data is truncated, and a half-written
    # temporary save lies beside it.
    data_file = next(ckpt_dir.glob("ckpt-6.data-*"))
    data_file.write_bytes(data_file.read_bytes()[:10])
    (ckpt_dir / "ckpt-8_temp").mkdir()
    (ckpt_dir / "ckpt-8_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"\0" * 7)


def _all_empty(ckpt_dir):
    for path in ckpt_dir.glob("ckpt-*"):
        if path.is_file():
            path.write_bytes(b"")


@pytest.fixture(scope="module")
def six_step_run(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("six") / "run"
    _in_process(tiny_config(str(model_dir), train_steps=6, keep_checkpoints=10))
    return model_dir


@pytest.mark.parametrize("damage,resumed_at,warning", [
    (_garbage_index, 6, "rebuilt it from the 3 checkpoint(s)"),
    (_empty_index, 6, "rebuilt it from the 3 checkpoint(s)"),
    (_truncated_newest, 3, "unusable checkpoint(s) ckpt-6 (IndexError); resumed from ckpt-3; "
                           "kept as unusable-ckpt-6.*"),
    (_all_empty, None, None),
])
def test_damaged_checkpoints_fall_back_and_nothing_is_overwritten_or_lost(
        six_step_run, tmp_path, capsys, damage, resumed_at, warning):
    import shutil

    model_dir = tmp_path / "run"
    shutil.copytree(six_step_run, model_dir)
    damage(model_dir / "checkpoints")
    before = _files(model_dir / "checkpoints")
    config = tiny_config(str(model_dir), train_steps=9, keep_checkpoints=10)
    if resumed_at is None:  # nothing usable: one error, nothing touched (no fresh start on top)
        with pytest.raises(UsageError, match=r"no usable checkpoint in .*ckpt-6 \(\w+\), ckpt-3 "
                                             r"\(\w+\), ckpt-0 \(\w+\); pass --overwrite"):
            _in_process(config)
        assert _files(model_dir / "checkpoints") == before
        assert capsys.readouterr().err == ""
        return
    summary = _in_process(config)
    assert summary["resumed_from"].endswith(f"ckpt-{resumed_at}") and summary["steps"] == 9
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and warning in err, err
    after = _files(model_dir / "checkpoints")
    # Every byte of every earlier checkpoint file is still there, under its name or set aside.
    for name, content in before.items():
        if name == "checkpoint" or "_temp/" in name:
            continue  # the index (rewritten by every save) and a save that never finished (removed)
        kept = [n for n in after if n == name or n.startswith(("unusable-" + name, name + ".damaged-"))]
        assert any(after[n] == content for n in kept), name
    assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith("ckpt-9")
    assert not list((model_dir / "checkpoints").glob("*_temp"))  # stale half-written saves cleaned


def test_resume_with_other_model_flags_is_refused_and_overwrite_moves_aside(tmp_path):
    model_dir = tmp_path / "run"
    tiny = ["--hidden_dim=16", "--depth=1", "--kernel_size=3", "--patch_size=2", "--image_size=8",
            "--global_batch_size=32", "--train_steps=2", "--steps_per_loop=2",
            "--synthetic_train_size=64", "--synthetic_test_size=32"]
    assert run_cli("convmixer_dist.main", *tiny, f"--model_dir={model_dir}").returncode == 0
    before = sorted(p.name for p in model_dir.iterdir())
    refused = run_cli("convmixer_dist.main", *tiny, "--hidden_dim=24", "--depth=2",
                      f"--model_dir={model_dir}")
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "--hidden_dim=24 (was 16)" in lines[0] and "--depth=2 (was 1)" in lines[0]
    assert sorted(p.name for p in model_dir.iterdir()) == before  # nothing touched

    fresh = run_cli("convmixer_dist.main", *tiny, "--hidden_dim=24", f"--model_dir={model_dir}",
                    "--overwrite")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and (moved[0] / "checkpoints").is_dir()
    assert "--hidden_dim=24" in (model_dir / "flags.txt").read_text()
    assert "--overwrite" not in (model_dir / "flags.txt").read_text()
