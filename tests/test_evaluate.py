"""evaluate: a real tiny training run's checkpoint reproduces the training's own final evaluation,
with per-class accuracy, confusion matrix, JSON and PNG; older checkpoints, overrides, bad input."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from convmixer_dist.commands import evaluate, saved_run
from convmixer_dist.errors import UsageError
from helpers import run_cli
from trained_run import EVAL_SIZE, NUM_CLASSES, TRAIN_STEPS, trained_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


def test_compute_metrics_by_hand():
    logits = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    labels = np.array([0, 2, 1, 2])
    m = evaluate.compute_metrics(logits, labels, num_classes=4)
    assert m["top1_accuracy"] == 0.5  # example 2 is a tie (argmax picks class 0): wrong
    assert m["top_k"] == 4 and m["top5_accuracy"] == 1.0
    np.testing.assert_array_equal(m["confusion_matrix"][:3, :3], [[1, 0, 0], [1, 0, 0], [0, 1, 1]])
    np.testing.assert_array_equal(m["class_counts"], [1, 1, 2, 0])
    np.testing.assert_allclose(m["per_class_accuracy"][:3], [1.0, 0.0, 0.5])
    assert np.isnan(m["per_class_accuracy"][3])  # no examples of class 3
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert m["loss"] == pytest.approx(-log_softmax[np.arange(4), labels].mean())
    top2 = evaluate.compute_metrics(logits[:, :2], np.array([0, 1, 1, 0]), num_classes=2)
    assert top2["top_k"] == 2 and top2["top5_accuracy"] == 1.0


def test_evaluate_matches_the_training_run_and_writes_report(run):
    model_dir, summary = run
    out = io.StringIO()
    report = evaluate.evaluate_run(saved_run.load_run_config(model_dir), out=out)
    assert report["step"] == TRAIN_STEPS and report["checkpoint"].endswith(f"ckpt-{TRAIN_STEPS}")
    assert report["examples"] == EVAL_SIZE == summary["eval_examples"]
    # Same weights, same split: the training's last evaluation (2 replicas) is reproduced.
    assert report["top1_accuracy"] == pytest.approx(summary["eval_accuracy"], abs=1e-9)
    assert report["loss"] == pytest.approx(summary["eval_loss"], abs=1e-4)
    assert report["top1_accuracy"] > 0.5  # 4 classes: chance is 0.25
    confusion = np.array(report["confusion_matrix"])
    assert confusion.shape == (NUM_CLASSES, NUM_CLASSES) and confusion.sum() == EVAL_SIZE
    assert np.trace(confusion) == round(report["top1_accuracy"] * EVAL_SIZE)
    for i, row in enumerate(report["per_class"]):
        assert row["class"] == f"class_{i}" and row["examples"] == confusion[i].sum()
        assert row["accuracy"] == pytest.approx(confusion[i, i] / confusion[i].sum())
    saved = json.load(open(os.path.join(model_dir, evaluate.REPORT_FILE)))
    assert saved["top1_accuracy"] == report["top1_accuracy"]
    with Image.open(os.path.join(model_dir, evaluate.CONFUSION_FILE)) as image:
        assert image.format == "PNG" and image.size[0] > 300
    text = out.getvalue()
    assert "batch 4/4: 100/100 examples" in text and "top-1 accuracy" in text
    assert "confusion matrix (rows: true class" in text and "class_3" in text


def test_evaluate_agrees_with_the_training_loops_metrics(run):
    import tensorflow as tf

    from convmixer_dist.data import pipeline as data
    from convmixer_dist.training import steps
    from convmixer_dist.config import derive

    model_dir, _ = run
    config = saved_run.load_run_config(model_dir)
    model, _ = saved_run.restore_model(config, saved_run.checkpoint_path(model_dir))
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    derived = derive(config, 1, *data.trained_sizes(config))
    core = steps.evaluate(steps.make_eval_step(strategy, model, config),
                          data.eval_dataset(strategy, config, derived))
    logits, labels = evaluate.predict_split(config, model, io.StringIO())
    ours = evaluate.compute_metrics(logits, labels, config.num_classes)
    assert ours["top1_accuracy"] == core["accuracy"] and ours["top5_accuracy"] == core["top5_accuracy"]
    assert ours["loss"] == pytest.approx(core["loss"], rel=1e-6)


def test_checkpoint_flag_and_overrides(run):
    model_dir, _ = run
    config = saved_run.load_run_config(model_dir, {"global_batch_size": "7"})
    assert config.global_batch_size == 7 and config.hidden_dim == 32 and config.model_dir == model_dir
    first = os.path.join(model_dir, "checkpoints", "ckpt-0")  # saved before the first step
    report = evaluate.evaluate_run(config, checkpoint=first, out=io.StringIO())
    assert report["step"] == 0 and report["examples"] == EVAL_SIZE  # partial last batch kept
    assert report["loss"] > 1.3  # untrained: near log(4)


def test_bad_inputs_are_usage_errors(run, tmp_path):
    model_dir, _ = run
    with pytest.raises(UsageError, match="does not exist"):
        saved_run.load_run_config(str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="no flags.txt"):
        saved_run.load_run_config(str(tmp_path))
    with pytest.raises(UsageError, match="--checkpoint=.*no such checkpoint"):
        saved_run.checkpoint_path(model_dir, os.path.join(model_dir, "checkpoints", "ckpt-999"))
    with pytest.raises(UsageError, match="--global_batch_size=x is not a valid int"):
        saved_run.load_run_config(model_dir, {"global_batch_size": "x"})
    # A checkpoint that does not fit the model in flags.txt (another architecture).
    other = tmp_path / "other"
    other.mkdir()
    flags_txt = open(os.path.join(model_dir, "flags.txt")).read().replace("--hidden_dim=32", "--hidden_dim=24")
    (other / "flags.txt").write_text(flags_txt)
    config = saved_run.load_run_config(str(other))
    with pytest.raises(UsageError, match="does not match the model"):
        saved_run.restore_model(config, saved_run.checkpoint_path(model_dir))


def test_command_prints_report_and_bad_input_is_one_line_exit_2(run, tmp_path):
    model_dir, _ = run
    ok = run_cli("convmixer_dist.commands.evaluate", f"--model_dir={model_dir}")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "checkpoint " in ok.stdout and "top-1 accuracy" in ok.stdout and "wrote " in ok.stdout
    bad = run_cli("convmixer_dist.commands.evaluate", f"--model_dir={tmp_path}")
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        f"error: --model_dir={tmp_path}: no flags.txt; expected the --model_dir of a training run "
        "(python -m convmixer_dist.main writes it)"]


@pytest.mark.parametrize("names,message", [("{broken", "not a readable JSON list of class names"),
                                           ('["a", "b"]', "2 names for 4 classes")])
def test_a_broken_or_short_class_names_file_is_one_usage_error(run, tmp_path, names, message):
    import shutil

    model_dir = str(tmp_path / "run")
    shutil.copytree(run[0], model_dir)
    for output in (evaluate.REPORT_FILE, evaluate.CONFUSION_FILE):  # from earlier evaluations
        if os.path.exists(os.path.join(model_dir, output)):
            os.remove(os.path.join(model_dir, output))
    with open(os.path.join(model_dir, "class_names.json"), "w") as f:
        f.write(names)
    config = saved_run.load_run_config(model_dir)
    with pytest.raises(UsageError, match=message):
        evaluate.evaluate_run(config, out=io.StringIO())
    assert not os.path.exists(os.path.join(model_dir, evaluate.REPORT_FILE))


def test_unwritable_outputs_are_refused_before_the_evaluation(run, tmp_path):
    import shutil

    model_dir = str(tmp_path / "run")
    shutil.copytree(run[0], model_dir)
    for output in (evaluate.REPORT_FILE, evaluate.CONFUSION_FILE):  # from earlier evaluations
        if os.path.exists(os.path.join(model_dir, output)):
            os.remove(os.path.join(model_dir, output))
    os.mkdir(os.path.join(model_dir, evaluate.REPORT_FILE))  # cannot be written, even by root
    out = io.StringIO()
    with pytest.raises(UsageError, match=rf"^--model_dir={model_dir}: .*eval_report.json is a directory"):
        evaluate.evaluate_run(saved_run.load_run_config(model_dir), out=out)
    assert out.getvalue() == ""  # no checkpoint restored, nothing evaluated
    assert not os.path.exists(os.path.join(model_dir, evaluate.CONFUSION_FILE))
