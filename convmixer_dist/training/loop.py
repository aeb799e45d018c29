"""The training driver, shaped like flax's examples/imagenet/train.py: `train_and_evaluate` resolves
the run plan (plan.py) and sets up (setup.py: inputs, train state, checkpoints, step functions), then
runs one loop whose body shows the periodic actions as blocks: progress line, stop signal, epoch end
(evaluation, best checkpoint, early stopping), checkpoint. The plan's `Periods` declares each period
once and decides where a multi-step call ends. A non-finite loss ends an attempt; with
--nan_policy=rollback the outer attempt loop restores the last checkpoint with a lower learning rate. Lines, summaries and summary.json come from the
chief only; every worker takes part in checkpoint saves.
"""
from __future__ import annotations

import itertools
import math
import time

import numpy as np
import tensorflow as tf

from convmixer_dist import optimization
from convmixer_dist.config import Config
from convmixer_dist.plan import Periods, plan
from convmixer_dist.preemption import StopSignal, Stopped
from convmixer_dist.training.inputs import prepare_inputs
from convmixer_dist.training.report import Counters, build_summary
from convmixer_dist.training.setup import Run, process_settings, set_up, stopped_early
from convmixer_dist.training.state import TrainingDiverged, TrainState, weights_fingerprint
from convmixer_dist.training.steps import evaluate

__all__ = ["Periods", "TrainingDiverged", "early_stopping_decision", "train_and_evaluate"]


def early_stopping_decision(val_loss: float, best_val_loss: float, epochs_without_gain: int,
                            patience: int) -> tuple[bool, int, bool]:
    """(improved, epochs without a lower validation loss, stop now) after an epoch's validation;
    patience 0 never stops."""
    improved = val_loss < best_val_loss
    without_gain = 0 if improved else epochs_without_gain + 1
    return improved, without_gain, bool(patience) and without_gain >= patience


def run_evaluation(run: Run, step: int, epoch: int, split: str) -> dict:
    """Evaluate the validation or the test split (BatchNorm statistics averaged first); a line."""
    run.checkpoints.sync_bn_statistics()
    dataset = run.inputs.val_dataset if split == "validation" else run.inputs.eval_dataset
    metrics = evaluate(run.eval_step, dataset)
    run.report.evaluation(step, epoch, metrics, split)
    return metrics


def end_of_epoch(run: Run, state: TrainState, step: int, epoch: int) -> tuple[dict, bool]:
    """Evaluate (the validation split if there is one, else test), keep the best-validation
    checkpoint, decide early stopping; returns (metrics, stop early)."""
    if run.inputs.val_dataset is None:
        return run_evaluation(run, step, epoch, "test"), False
    metrics = run_evaluation(run, step, epoch, "validation")
    improved, without_gain, stop_early = early_stopping_decision(
        metrics["loss"], float(state.best_val_loss.numpy()), int(state.epochs_without_gain.numpy()),
        run.config.early_stopping_patience)
    state.epochs_without_gain.assign(without_gain)
    if improved:
        state.best_val_loss.assign(metrics["loss"])
        run.checkpoints.save_best(step)
    return metrics, stop_early


def roll_back(run: Run, state: TrainState, counters: Counters, err: TrainingDiverged) -> None:
    """--nan_policy=rollback: restore the last checkpoint, lower the learning rate; else re-raise."""
    config, saver = run.config, run.checkpoints.latest
    if config.nan_policy != "rollback" or counters.rollbacks >= config.nan_max_rollbacks:
        raise TrainingDiverged(f"{err}; the last good checkpoint is kept in {saver.main_dir}") from None
    counters.rollbacks += 1
    path = saver.restore_latest()
    state.lr_scale.assign(state.lr_scale * config.nan_lr_factor)
    run.report.say(f"warning: {err}; rolled back to {path} (step {int(state.step.numpy())}) "
                   f"with learning rate x{float(state.lr_scale.numpy()):g} "
                   f"(rollback {counters.rollbacks}/{config.nan_max_rollbacks})")


def final_evaluation(run: Run, state: TrainState, metrics: dict) -> tuple[dict, dict]:
    """The test-split metrics to report and, with a validation split, the model-selection facts.

    With validation the best-validation weights are restored first and the test split is evaluated
    (model selection never sees it); without, the last epoch's evaluation is the test split's.
    """
    step = int(state.step.numpy())
    if run.inputs.val_dataset is None:
        if not metrics:  # Resumed a finished run: evaluate the restored weights.
            metrics = evaluate(run.eval_step, run.inputs.eval_dataset)
        return metrics, {}
    best = run.checkpoints.best.restore_latest()
    validation = {"best_checkpoint": best, "best_validation_loss": float(state.best_val_loss.numpy()),
                  "best_step": int(state.step.numpy()),
                  "stopped_early": step < run.inputs.derived.total_steps}
    run.report.say(f"restored the best validation weights from {best}")
    return run_evaluation(run, step, run.inputs.derived.epochs - 1, "test"), validation


def train_and_evaluate(config: Config, strategy: tf.distribute.Strategy) -> dict:
    """Train (resuming from MODEL_DIR if it has a checkpoint), evaluate each epoch, return the summary."""
    wall_start = time.time()
    run_plan = plan(config, strategy)  # Data, sizes, devices, periods: checked before anything is written.
    policy, periods = run_plan.policy, run_plan.periods
    with process_settings(config, policy):
        inputs = prepare_inputs(run_plan, strategy)
        with StopSignal(strategy) as stop, inputs.reporting_errors():  # A stop signal now saves first.
            run, state = set_up(config, strategy, policy, inputs, run_plan.profile_window, stop)
            counters = Counters(nan_at_step=config.fault_inject_nan_at_step)
            has_validation = inputs.val_dataset is not None
            for _attempt in itertools.count():  # An attempt ends at a non-finite loss (NaN rollback).
                try:
                    metrics, step = {}, int(state.step.numpy())
                    batches, window, timed = inputs.train_batches(step), np.zeros(3), False
                    while step < periods.total and not stopped_early(config, state, has_validation):
                        epoch, n = step // periods.epoch, periods.steps_in_next_call(step)
                        if step % periods.epoch == 0:
                            state.epoch_totals.assign(tf.zeros(3, tf.float64))
                        lr, started = float(optimization.current_learning_rate(state.optimizer)), time.time()
                        with run.profile.step(step, n):
                            *totals, done = [float(t) for t in run.train_loop(
                                batches, tf.constant(n, tf.int32), tf.constant(step, tf.int64),
                                tf.constant(counters.nan_at_step, tf.int64))]
                        seconds, totals = time.time() - started, np.array(totals)
                        n = int(done)  # Fewer than asked: stopped by a signal.
                        if step < counters.nan_at_step <= step + n:
                            counters.nan_at_step = 0  # The injected fault fires once per process.
                        if not math.isfinite(totals[0]) and policy != "mixed_float16":
                            raise TrainingDiverged(f"the training loss became non-finite between steps "
                                                   f"{step + 1} and {step + n}")
                        step += n
                        state.step.assign(step)
                        state.epoch_totals.assign_add(totals)
                        window += totals
                        if timed:  # The first call of an attempt includes tracing and compilation.
                            counters.add_timed(n * config.global_batch_size, seconds)
                        timed, stop_early = True, False

                        if n and periods.log_due(step):  # ---- progress line
                            images = n * config.global_batch_size
                            rate = counters.window_rate(fallback=images / max(seconds, 1e-9))
                            run.report.train(step, epoch, window, lr, rate, state.optimizer)
                            window[:] = 0
                        if stop.requested():  # ---- stop signal: save, then exit (rerun to resume)
                            run.checkpoints.save(step)
                            raise Stopped(f"stopped by signal at step {step}; checkpoint saved in "
                                          f"{run.checkpoints.latest.main_dir}, rerun the same command "
                                          "to resume")
                        if periods.epoch_end(step):  # ---- epoch end: evaluate, best, early stopping
                            metrics, stop_early = end_of_epoch(run, state, step, epoch)
                        if periods.checkpoint_due(step) or stop_early:  # ---- checkpoint (after evaluation)
                            run.checkpoints.save(step)
                        if stop_early:
                            run.report.say(f"early stopping at step {step}: no lower validation loss for "
                                           f"{config.early_stopping_patience} epochs")
                            break
                    break
                except TrainingDiverged as err:
                    roll_back(run, state, counters, err)
            run.profile.close()
            step = int(state.step.numpy())  # The step reached (the best checkpoint may be restored below).
            eval_metrics, validation = final_evaluation(run, state, metrics)
            run.report.flush()
        return build_summary(config, inputs.derived, eval_metrics, state.epoch_totals.numpy(), step,
                             counters, time.time() - wall_start, policy, run.xla, run.parameters,
                             run.restored, float(state.lr_scale.numpy()), validation,
                             weights_fingerprint(state.model))
