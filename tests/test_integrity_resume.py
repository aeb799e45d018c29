"""Issue 22, resume rows: a resume is checked against the run itself before anything is written:
the identity (model, data split and stream) never changes, the checkpoint's variables must match
the model's (a layout-changing flag is named), schedule changes are applied and stated. A refused
resume leaves every file of the run byte-identical. In process, on one tiny run."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil

import pytest

from convmixer_dist import strategy as strategy_lib
from convmixer_dist.errors import UsageError
from convmixer_dist.training.loop import train_and_evaluate
from helpers import file_contents, run_cli, tiny_config


def train(config) -> tuple[dict, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = train_and_evaluate(config, strategy_lib.create_strategy(config))
    return summary, out.getvalue()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    config = tiny_config(str(tmp_path_factory.mktemp("base") / "run"), train_steps=4, steps_per_loop=2,
                         checkpoint_every_steps=2, validation_fraction=0.25, early_stopping_patience=0)
    train(config)
    return config


@pytest.fixture
def run(base_run, tmp_path):
    model_dir = tmp_path / "run"
    shutil.copytree(base_run.model_dir, model_dir)
    return dataclasses.replace(base_run, model_dir=str(model_dir))


@pytest.mark.parametrize("change, named", [
    (dict(dropout_rate=0.1), "only in this model: "),  # a layout-changing flag (dropout layers, their RNG)
    (dict(validation_fraction=0.5), None),
    (dict(seed=2), None),
    (dict(global_batch_size=16), None),
])
def test_a_resume_that_changes_the_run_is_refused_before_anything_is_written(run, change, named):
    before = file_contents(run.model_dir)
    (name, value), = change.items()
    with pytest.raises(UsageError, match=rf"--{name}={value} \(was [0-9.]+\)") as refused:
        train(dataclasses.replace(run, train_steps=6, **change))
    assert named is None or named in str(refused.value)
    assert file_contents(run.model_dir) == before  # flags.txt, checkpoints, logs, summary: untouched


def test_an_emptied_identity_falls_back_to_flags_txt(run):
    identity = os.path.join(run.model_dir, "checkpoints", "identity.json")
    with open(identity) as f:
        order = json.load(f)["data_order"]  # kept: without it the run reads as an older version's
    with open(identity, "w") as f:
        json.dump({"data_order": order}, f)  # every flag gone
    before = file_contents(run.model_dir)
    with pytest.raises(UsageError, match=r"\(flags.txt\): --hidden_dim=32 \(was 16\)"):
        train(dataclasses.replace(run, hidden_dim=32))
    assert file_contents(run.model_dir) == before


def test_schedule_changes_are_applied_and_stated(run):
    summary, out = train(dataclasses.replace(run, train_steps=6, learning_rate=0.02))
    assert "Resumed from" in out and summary["steps"] == 6
    assert "resuming with a changed schedule: --train_steps=6 (was 4)" in out
    assert "resuming with a changed schedule: --learning_rate=0.02 (was 0.01)" in out
    flags_txt = open(os.path.join(run.model_dir, "flags.txt")).read()
    assert "--train_steps=6" in flags_txt and "--learning_rate=0.02" in flags_txt  # the run's flags now


def test_a_layout_change_on_the_command_line_is_one_line(run):
    before = file_contents(run.model_dir)
    flags_txt = os.path.join(run.model_dir, "flags.txt")
    result = run_cli("convmixer_dist.main", f"--flagfile={flags_txt}", "--dropout_rate=0.1")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: --model_dir={run.model_dir}: ckpt-4 was saved by another model "
                                    "layout (flags changed since the run was written: --dropout_rate=0.1 (was 0.0)")
    assert file_contents(run.model_dir) == before


def test_an_early_stopped_run_stays_finished(tmp_path):
    config = tiny_config(str(tmp_path / "run"), train_steps=0, epochs=8, steps_per_loop=2,
                         checkpoint_every_steps=100, validation_fraction=0.25, early_stopping_patience=1,
                         learning_rate=0.05, synthetic_train_size=128)
    first, _ = train(config)
    assert first["stopped_early"] and first["steps"] < 24
    checkpoints = file_contents(os.path.join(config.model_dir, "checkpoints"))
    again, out = train(config)  # the same command again
    assert "it is finished, nothing more is trained" in out
    assert again["steps"] == first["steps"] and again["test_accuracy"] == first["test_accuracy"]
    assert file_contents(os.path.join(config.model_dir, "checkpoints")) == checkpoints  # no further epoch


def test_export_never_replaces_an_export_and_evaluate_falls_back(run, tmp_path, monkeypatch, capsys):
    from convmixer_dist import resume_check
    from convmixer_dist.commands import evaluate, export, saved_run

    reopened = saved_run.load_run_config(run.model_dir)
    output = tmp_path / "export"
    info = export.export_run(reopened, str(output), out=io.StringIO())
    assert info["checkpoint"].endswith("ckpt-4")
    before = file_contents(output)
    with pytest.raises(UsageError, match="exists and holds an earlier export; an export never replaces"):
        export.export_run(reopened, str(output), out=io.StringIO())
    assert file_contents(output) == before
    # The newest checkpoint lost its data file (rotated away under a running evaluation, or damaged).
    checkpoints = os.path.join(run.model_dir, "checkpoints")
    os.remove(os.path.join(checkpoints, "ckpt-4.data-00000-of-00001"))
    report = evaluate.evaluate_run(reopened, out=io.StringIO())
    assert report["checkpoint"].endswith("ckpt-2") and report["step"] == 2
    assert "ckpt-4 could not be restored (rotated away or damaged); using ckpt-2" in capsys.readouterr().err
    # Every checkpoint listed first is gone by the time it is read: the run is listed again.
    listings = iter([[os.path.join(checkpoints, "ckpt-1")], [os.path.join(checkpoints, "ckpt-2")]])
    real = resume_check.local_checkpoints
    monkeypatch.setattr(resume_check, "local_checkpoints", lambda d: next(listings, None) or real(d))
    model, step, path = saved_run.restore_checkpoint(reopened)
    assert step == 2 and path.endswith("ckpt-2")
