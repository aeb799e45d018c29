"""The pure pieces of the training loop: how many steps the next call runs, the early-stopping
decision, and summary.json's contents."""
import numpy as np
import pytest

from convmixer_dist.training import loop, report
from convmixer_dist.config import derive
from helpers import tiny_config


def _periods(epoch_end, steps_per_loop, log_every, checkpoint_every, profile_steps=None):
    """One epoch ending at `epoch_end`, which is also the run's last step."""
    return loop.Periods(total=epoch_end, epoch=epoch_end, log=log_every, checkpoint=checkpoint_every,
                        steps_per_loop=steps_per_loop, profile=profile_steps)


@pytest.mark.parametrize("step, expected", [
    (0, 10),    # a full call
    (10, 5),    # cut at the progress line every 15 steps
    (15, 10),
    (25, 5),    # cut at the checkpoint every 30 steps
    (30, 10),
    (40, 5),    # cut at the progress line (45)
    (45, 5),    # cut at the epoch end (50)
])
def test_steps_in_next_call_stops_at_every_boundary(step, expected):
    periods = _periods(epoch_end=50, steps_per_loop=10, log_every=15, checkpoint_every=30)
    assert periods.steps_in_next_call(step) == expected


def test_steps_in_next_call_runs_one_step_per_call_inside_a_profile_window():
    window = (12, 15)
    calls, step = [], 0
    periods = _periods(epoch_end=20, steps_per_loop=10, log_every=100, checkpoint_every=100,
                       profile_steps=window)
    while step < 20:
        n = periods.steps_in_next_call(step)
        calls.append((step, n))
        step += n
    assert calls == [(0, 10), (10, 2), (12, 1), (13, 1), (14, 1), (15, 5)]


def test_steps_in_next_call_never_crosses_the_epoch_end_nor_returns_zero():
    periods = _periods(epoch_end=37, steps_per_loop=8, log_every=5, checkpoint_every=7,
                       profile_steps=(3, 9))
    for step in range(0, 37):
        n = periods.steps_in_next_call(step)
        assert 1 <= n <= 8 and step + n <= 37


@pytest.mark.parametrize("val_loss, best, without_gain, patience, expected", [
    (0.5, 0.6, 2, 3, (True, 0, False)),      # improved: the counter restarts
    (0.7, 0.6, 1, 3, (False, 2, False)),     # one more epoch without gain
    (0.7, 0.6, 2, 3, (False, 3, True)),      # patience exhausted
    (0.6, 0.6, 0, 1, (False, 1, True)),      # equal is not lower
    (0.9, 0.6, 50, 0, (False, 51, False)),   # patience 0: never stops
    (1.0, float("inf"), 0, 2, (True, 0, False)),  # the first validation always improves
])
def test_early_stopping_decision(val_loss, best, without_gain, patience, expected):
    assert loop.early_stopping_decision(val_loss, best, without_gain, patience) == expected


def test_build_summary_reports_test_metrics_last_epoch_training_and_throughput(tmp_path):
    config = tiny_config(str(tmp_path))
    derived = derive(config, 2, config.synthetic_train_size, config.synthetic_test_size)
    counters = report.Counters(images=640, seconds=2.0, rollbacks=1)
    summary = report.build_summary(
        config, derived, {"accuracy": 0.5, "loss": 1.25, "top5_accuracy": 0.9, "examples": 100},
        np.array([12.0, 6.0, 24.0]), 6, counters, 3.5, "float32", False, 1234, None, 0.5,
        {"best_step": 3}, {"weights_sha256": "abc", "weights_abs_sum": 1.0})
    assert summary["eval_accuracy"] == 0.5 and summary["eval_examples"] == 100
    for key in ("accuracy", "loss", "top5_accuracy", "examples"):  # test_* and their older names
        assert summary[f"test_{key}"] == summary[f"eval_{key}"]
    assert summary["train_loss"] == 0.5 and summary["train_accuracy"] == 0.25
    assert summary["images_per_sec"] == 320.0 and summary["nan_rollbacks"] == 1
    assert summary["steps"] == 6 and summary["epochs"] == derived.epochs
    assert summary["num_replicas"] == 2 and summary["parameters"] == 1234
    assert summary["best_step"] == 3 and summary["weights_sha256"] == "abc"
    assert summary["learning_rate_scale"] == 0.5 and summary["resumed_from"] is None


def test_build_summary_without_timed_calls_or_a_trained_epoch(tmp_path):
    config = tiny_config(str(tmp_path))
    summary = report.build_summary(
        config, derive(config, 1, config.synthetic_train_size, config.synthetic_test_size),
        {"accuracy": 1.0, "loss": 0.0, "top5_accuracy": 1.0, "examples": 4},
        np.zeros(3), 6, report.Counters(), 0.1, "float32", False, 1, "ckpt-6", 1.0, {}, {})
    assert summary["images_per_sec"] is None
    assert summary["train_loss"] is None and summary["train_accuracy"] is None
    assert "best_step" not in summary
