"""The training driver: `train_and_evaluate(config, strategy)` composes small module-level functions
and reads top to bottom (the shape of flax's examples/imagenet/train.py):

prepare_inputs -> create_train_state (state.py: model, optimizer, step and the other checkpointed
variables, in `strategy.scope()`) -> savers (resume, or save step 0) -> make_train_loop /
make_eval_step (steps.py) ->
train_with_rollbacks (NaN rollback) -> train_until_done -> per epoch: train_epoch (calls of
`steps_in_next_call` steps each, progress lines, checkpoints, stop signals) and end_of_epoch
(evaluation, early_stopping_decision, best checkpoint) -> final_evaluation -> build_summary.
What the functions share is passed explicitly: `TrainState` (checkpointed), `Loop` (fixed for the
run) and `Counters` (throughput, rollbacks, the fault-injection step). Side effects (TensorBoard
summaries, progress lines, summary.json) come from the chief only; every worker takes part in
checkpoint saves.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from convmixer_dist import data, image_folder, optimization, preemption, rundir, tfrecord
from convmixer_dist.checkpoint import CheckpointSaver
from convmixer_dist.config import Config, Derived, derive
from convmixer_dist.model import count_params
from convmixer_dist.precision import resolve_precision, use_xla
from convmixer_dist.preemption import PreemptionWatcher
from convmixer_dist.profiling import (ProfileWindow, check_profile_window, parse_profile_steps,
                                      start_profiler_server)
from convmixer_dist.strategy import device_kind, is_chief
from convmixer_dist.training.state import (TrainState, create_savers, create_train_state,
                                           make_bn_statistics_sync, weights_finite, weights_fingerprint)
from convmixer_dist.training.steps import evaluate, make_eval_step, make_train_loop


class TrainingDiverged(RuntimeError):
    """The loss or the weights became non-finite (outside float16 loss-scale skips)."""


class Preempted(RuntimeError):
    """A termination signal arrived; a checkpoint was saved at the step in the message."""


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _log_period(config: Config, derived: Derived) -> int:
    if config.log_every_steps:
        return config.log_every_steps
    # About ten lines per epoch, at loop boundaries so logging never shortens a tf.function call.
    tenth = max(1, min(derived.steps_per_epoch, derived.total_steps) // 10)
    return max(1, round(tenth / config.steps_per_loop)) * config.steps_per_loop


def _say(chief: bool, text: str) -> None:
    if chief:
        print(text, flush=True)


def train_and_evaluate(config: Config, strategy: tf.distribute.Strategy) -> dict:
    """Train (resuming from MODEL_DIR if it has a checkpoint), evaluate each epoch, return the summary."""
    wall_start = time.time()
    chief = is_chief(strategy)
    kind = device_kind(strategy)
    policy = resolve_precision(config.precision, kind)
    previous_policy = keras.mixed_precision.dtype_policy()
    was_deterministic = _op_determinism_enabled()
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        return _train_and_evaluate(config, strategy, chief, kind, policy, wall_start)
    finally:  # Process-wide settings go back to what the caller had.
        keras.mixed_precision.set_dtype_policy(previous_policy)
        rundir.release_run_lock(config.model_dir)  # Taken by rundir.prepare_model_dir (chief).
        if not was_deterministic:
            _disable_op_determinism()


def _op_determinism_enabled() -> bool:
    """Whether `tf.config.experimental.enable_op_determinism()` is in force (no public getter)."""
    from tensorflow.python.framework import config as tf_config

    return tf_config.is_op_determinism_enabled()


def _disable_op_determinism() -> None:
    """Undo `enable_op_determinism` (TensorFlow has no public function for it)."""
    from tensorflow.python.framework import config as tf_config

    tf_config.disable_op_determinism()


def _train_and_evaluate(config: Config, strategy, chief: bool, kind: str, policy: str,
                        wall_start: float) -> dict:
    # Seeds python, numpy, TensorFlow and Keras first: tf.data's shuffle order depends on the global seed.
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()

    # ---- input pipeline (validated before anything is written)
    inputs = prepare_inputs(config, strategy)
    derived = inputs.derived
    profile_warning = check_profile_window(parse_profile_steps(config.profile_steps), derived.total_steps)
    if profile_warning:
        _say(chief, profile_warning)
    preemption.start_writing()  # A stop signal before this point exits at once (nothing written).
    moved = rundir.prepare_model_dir(config, chief)
    if moved:
        _say(chief, f"--overwrite: moved the previous run to {moved}")
    if chief and inputs.arrays and inputs.arrays.get("class_names"):
        image_folder.save_class_names(config.model_dir, inputs.arrays["class_names"])

    # ---- model, optimizer, checkpoint (resume, or step 0 as the first rollback target)
    state = create_train_state(strategy, config, derived, kind, policy)
    saver, best_saver = create_savers(strategy, config, chief, state.checkpoint)
    restored = saver.restore_latest()
    if restored:
        _say(chief, f"Resumed from {restored} at step {int(state.step.numpy())}/{derived.total_steps}")
    else:
        saver.save(0)

    # ---- step functions, summaries, profiling
    xla = use_xla(config, kind)
    _say(chief, describe_run(config, derived, state.model, policy, xla))
    train_loop = make_train_loop(strategy, state.model, state.optimizer, config, xla,
                                 stop_flag=preemption.stop_flag())
    loop = Loop(config=config, derived=derived, strategy=strategy, chief=chief, policy=policy, xla=xla,
                inputs=inputs, train_loop=train_loop,
                eval_step=make_eval_step(strategy, state.model, config), saver=saver,
                best_saver=best_saver, writers=create_writers(config, chief, inputs.val_dataset is not None),
                profile=create_profile_window(config, chief),
                sync_bn_statistics=make_bn_statistics_sync(strategy, state.model),
                log_every=_log_period(config, derived))

    # ---- loop (NaN rollbacks, preemption, early stopping inside)
    counters = Counters(nan_at_step=config.fault_inject_nan_at_step)
    with PreemptionWatcher(strategy) as watcher, _reporting_corrupt_inputs(config, inputs.arrays):
        metrics = train_with_rollbacks(loop, state, counters, watcher)
    loop.profile.close()
    step = int(state.step.numpy())  # The step reached (the best checkpoint may be restored below).
    eval_metrics, validation = final_evaluation(loop, state, metrics)
    for writer in loop.writers.values():
        writer.flush()
    return build_summary(config, derived, eval_metrics, state.epoch_totals.numpy(),
                         step, counters, time.time() - wall_start, policy, xla,
                         count_params(state.model), restored, float(state.lr_scale.numpy()),
                         validation, weights_fingerprint(state.model))


# ------------------------------------------------------------------------------------------ setup
@dataclasses.dataclass(frozen=True)
class Inputs:
    """The datasets of a run: loaded arrays (None for synthetic data), sizes and the splits."""

    arrays: dict | None
    derived: Derived
    train_ids: np.ndarray | None  # With --validation_fraction: the training examples kept.
    eval_dataset: object  # The test split, evaluated at the end (and each epoch without validation).
    val_dataset: object | None  # The held-out validation split, evaluated each epoch.


def prepare_inputs(config: Config, strategy) -> Inputs:
    """Load and check the data, split off the validation set, derive the step counts."""
    arrays = None if config.dataset == "synthetic" else data.load_arrays(config)
    full_train, eval_size = data.split_sizes(config, arrays)
    # --validation_fraction: a seeded held-out part of the training split, evaluated each epoch.
    split_ids = data.validation_split(config, full_train)
    train_ids, val_ids = split_ids if split_ids else (None, None)
    derived = derive(config, strategy.num_replicas_in_sync,
                     full_train if train_ids is None else len(train_ids), eval_size)
    data.augment_spec(config).validate()
    eval_dataset = data.eval_dataset(strategy, config, derived, arrays)
    val_dataset = (None if val_ids is None
                   else data.eval_dataset(strategy, config, derived, arrays, split="validation",
                                          ids=val_ids))
    return Inputs(arrays, derived, train_ids, eval_dataset, val_dataset)


def create_writers(config: Config, chief: bool, validation: bool) -> dict:
    """TensorBoard writers train/validation/test (chief only; no-op writers elsewhere). Runs written
    before the test split's run was named `test` have it under `eval/`; `plot` reads both as one."""
    def writer(name: str, enabled: bool = True):
        if chief and enabled:
            return tf.summary.create_file_writer(os.path.join(config.model_dir, name))
        return tf.summary.create_noop_writer()
    return {"train": writer("train"), "test": writer("test"), "validation": writer("validation", validation)}


def create_profile_window(config: Config, chief: bool) -> ProfileWindow:
    """The --profile_steps window (chief only); starts the --profiler_port server."""
    profile = ProfileWindow(config.model_dir, parse_profile_steps(config.profile_steps),
                            config.profile_host_tracer_level, config.profile_python_tracer_level,
                            enabled=chief)
    if config.profiler_port and chief:
        start_profiler_server(config.profiler_port)
        _say(chief, f"profiler server on port {config.profiler_port}: capture from TensorBoard's "
                    f"Profile tab with grpc://HOSTNAME:{config.profiler_port}")
    return profile


@dataclasses.dataclass(frozen=True)
class Loop:
    """What every epoch needs besides the train state; fixed for the whole run."""

    config: Config
    derived: Derived
    strategy: tf.distribute.Strategy
    chief: bool
    policy: str
    xla: bool
    inputs: Inputs
    train_loop: Callable
    eval_step: Callable
    saver: CheckpointSaver
    best_saver: CheckpointSaver
    writers: dict
    profile: ProfileWindow
    sync_bn_statistics: Callable[[], None]
    log_every: int


@dataclasses.dataclass
class Counters:
    """What the loop counts across epochs and NaN rollbacks (passed explicitly, changed in place)."""

    nan_at_step: int = 0  # --fault_inject_nan_at_step until the injected fault has fired once.
    images: int = 0  # Images trained in timed calls (the first call of an attempt compiles) ...
    seconds: float = 0.0  # ... and their wall time: the run's images/s (summary.json).
    window_images: int = 0  # The same since the last progress line: TensorBoard's images_per_sec,
    window_seconds: float = 0.0  # so a slowdown shows instead of vanishing in the run's average.
    rollbacks: int = 0

    @property
    def images_per_sec(self) -> float | None:
        return self.images / self.seconds if self.seconds else None

    def add_timed(self, images: int, seconds: float) -> None:
        """Count one timed loop call in the run's and the window's rates."""
        self.images, self.seconds = self.images + images, self.seconds + seconds
        self.window_images, self.window_seconds = self.window_images + images, self.window_seconds + seconds

    def window_rate(self, fallback: float) -> float:
        """Images/s since the previous call (a new window starts); `fallback` (the last call's rate)
        when the window holds only an untimed call."""
        rate = self.window_images / self.window_seconds if self.window_seconds else fallback
        self.window_images, self.window_seconds = 0, 0.0
        return rate


def describe_run(config: Config, derived: Derived, model: keras.Model, policy: str, xla: bool) -> str:
    """The one-line description printed before training."""
    return (f"ConvMixer-{config.hidden_dim}/{config.depth} k{config.kernel_size} "
            f"p{config.patch_size}, {count_params(model):,} parameters; strategy={config.strategy} "
            f"replicas={derived.num_replicas} precision={policy} xla={'on' if xla else 'off'}; "
            f"{derived.total_steps} steps ({derived.epochs} epochs x {derived.steps_per_epoch}), "
            f"global batch {config.global_batch_size} ({derived.per_replica_batch_size}/replica)")


def _reporting_corrupt_inputs(config: Config, arrays):
    """A corrupt image surfaces as a decode error mid-run; name the file in one line."""
    if config.dataset == "image_folder":
        return image_folder.reporting_corrupt_files(list(arrays["train"][0]) + list(arrays["test"][0]))
    if config.dataset == "tfrecord":
        return tfrecord.reporting_record_errors(config.data_dir)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------- loop
def steps_in_next_call(step: int, epoch_end: int, steps_per_loop: int, log_every: int,
                       checkpoint_every: int, profile_steps: tuple[int, int] | None = None) -> int:
    """How many steps the next tf.function call runs from `step`: --steps_per_loop, cut at the next
    epoch end, progress line and checkpoint, and inside a profile window one step per call (one
    profiler marker per step)."""
    boundaries = [epoch_end, (step // log_every + 1) * log_every,
                  (step // checkpoint_every + 1) * checkpoint_every]
    if profile_steps is not None:
        start, end = profile_steps
        boundaries += [start, step + 1 if start <= step < end else end]
    return min([b for b in [step + steps_per_loop] + boundaries if b > step]) - step


def train_with_rollbacks(loop: Loop, state: TrainState, counters: Counters, watcher) -> dict:
    """Train to the end (or an early stop); on a non-finite loss with --nan_policy=rollback, restore
    the last checkpoint with a lower learning rate and go on. Returns the last evaluation's metrics."""
    config = loop.config
    while True:
        try:
            return train_until_done(loop, state, counters, watcher)
        except TrainingDiverged as err:
            if config.nan_policy != "rollback" or counters.rollbacks >= config.nan_max_rollbacks:
                raise TrainingDiverged(f"{err}; the last good checkpoint is kept in "
                                       f"{loop.saver.main_dir}") from None
            counters.rollbacks += 1
            path = loop.saver.restore_latest()
            state.lr_scale.assign(state.lr_scale * config.nan_lr_factor)
            _say(loop.chief, f"warning: {err}; rolled back to {path} (step {int(state.step.numpy())}) "
                             f"with learning rate x{float(state.lr_scale.numpy()):g} "
                             f"(rollback {counters.rollbacks}/{config.nan_max_rollbacks})")


def train_until_done(loop: Loop, state: TrainState, counters: Counters, watcher) -> dict:
    """Epochs from the current step to the last one (or an early stop); each epoch ends with its
    evaluation. Returns the last evaluation's metrics ({} if there was nothing left to train)."""
    derived = loop.derived
    step = int(state.step.numpy())
    iterator = iter(data.train_dataset(loop.strategy, loop.config, derived, loop.inputs.arrays, step,
                                       ids=loop.inputs.train_ids))
    metrics: dict = {}
    timed = False  # The first call of an attempt includes tracing and compilation: not timed.
    while step < derived.total_steps:
        epoch = step // derived.steps_per_epoch
        if step == epoch * derived.steps_per_epoch:
            state.epoch_totals.assign(tf.zeros(3, tf.float64))
        step = train_epoch(loop, state, iterator, counters, watcher, timed)
        timed = True
        metrics, stop_early = end_of_epoch(loop, state, step, epoch)
        if stop_early:
            break
    return metrics


def train_epoch(loop: Loop, state: TrainState, iterator, counters: Counters, watcher,
                timed: bool) -> int:
    """Train from the current step to the end of its epoch (the run's last step at most), with
    progress lines, periodic checkpoints and the stop-signal check; returns the step reached."""
    config, derived = loop.config, loop.derived
    step = int(state.step.numpy())
    epoch = step // derived.steps_per_epoch
    epoch_end = min((epoch + 1) * derived.steps_per_epoch, derived.total_steps)
    window = np.zeros(3)
    while step < epoch_end:
        n = steps_in_next_call(step, epoch_end, config.steps_per_loop, loop.log_every,
                               config.checkpoint_every_steps,
                               loop.profile.steps if loop.profile.enabled else None)
        lr = float(optimization.current_learning_rate(state.optimizer))
        started = time.time()
        with loop.profile.step(step, n):
            *totals, done = [float(t) for t in loop.train_loop(
                iterator, tf.constant(n, tf.int32), tf.constant(step, tf.int64),
                tf.constant(counters.nan_at_step, tf.int64))]
        seconds = time.time() - started
        totals, n = np.array(totals), int(done)  # n < requested: stopped by a signal
        if step < counters.nan_at_step <= step + n:
            counters.nan_at_step = 0  # The injected fault fires once per process.
        if not math.isfinite(totals[0]) and loop.policy != "mixed_float16":
            raise TrainingDiverged(f"the training loss became non-finite between steps "
                                   f"{step + 1} and {step + n}")
        step += n
        state.step.assign(step)
        state.epoch_totals.assign_add(totals)
        window += totals
        if timed:
            counters.add_timed(n * config.global_batch_size, seconds)
        timed = True
        if n and (step % loop.log_every == 0 or step == epoch_end):
            rate = counters.window_rate(fallback=n * config.global_batch_size / max(seconds, 1e-9))
            log_train(loop, state, step, epoch, window, lr, rate)
            window[:] = 0
        if watcher.should_stop():
            save_checkpoint(loop, state, step)
            raise Preempted(f"stopped by signal at step {step}; checkpoint saved in "
                            f"{loop.saver.main_dir}, rerun the same command to resume")
        # Checkpoints at an epoch's end wait for its evaluation (end_of_epoch), so a resumed run
        # never skips an evaluation.
        if step % config.checkpoint_every_steps == 0 and step < epoch_end:
            save_checkpoint(loop, state, step)
    return step


def early_stopping_decision(val_loss: float, best_val_loss: float, epochs_without_gain: int,
                            patience: int) -> tuple[bool, int, bool]:
    """(improved, epochs without a lower validation loss, stop now) after an epoch's validation;
    patience 0 never stops."""
    improved = val_loss < best_val_loss
    without_gain = 0 if improved else epochs_without_gain + 1
    return improved, without_gain, bool(patience) and without_gain >= patience


def end_of_epoch(loop: Loop, state: TrainState, step: int, epoch: int) -> tuple[dict, bool]:
    """Evaluate (validation split if there is one, else test), keep the best-validation checkpoint,
    decide early stopping, checkpoint when due; returns (metrics, stop early)."""
    config = loop.config
    validation = loop.inputs.val_dataset is not None
    metrics = run_evaluation(loop, step, epoch, validation=validation)
    stop_early = False
    if validation:
        improved, without_gain, stop_early = early_stopping_decision(
            metrics["loss"], float(state.best_val_loss.numpy()), int(state.epochs_without_gain.numpy()),
            config.early_stopping_patience)
        state.epochs_without_gain.assign(without_gain)
        if improved:
            state.best_val_loss.assign(metrics["loss"])
            loop.sync_bn_statistics()
            loop.best_saver.save(step)
    if stop_early or step % config.checkpoint_every_steps == 0 or step == loop.derived.total_steps:
        save_checkpoint(loop, state, step)
    if stop_early:
        _say(loop.chief, f"early stopping at step {step}: no lower validation loss for "
                         f"{config.early_stopping_patience} epochs")
    return metrics, stop_early


def save_checkpoint(loop: Loop, state: TrainState, step: int) -> None:
    """Average BatchNorm statistics, refuse non-finite weights, save (every worker takes part)."""
    loop.sync_bn_statistics()
    if not weights_finite(state.model):
        raise TrainingDiverged(f"the weights became non-finite by step {step}")
    loop.saver.save(step)


def log_train(loop: Loop, state: TrainState, step: int, epoch: int, window, lr: float,
              rate: float) -> None:
    """A progress line and the train summaries over the steps since the last line."""
    config, derived = loop.config, loop.derived
    loss, acc = window[0] / max(window[2], 1), window[1] / max(window[2], 1)
    eta = (derived.total_steps - step) * config.global_batch_size / max(rate, 1e-9)
    _say(loop.chief, f"epoch {epoch + 1}/{derived.epochs} step {step}/{derived.total_steps} "
                     f"loss {loss:.4f} acc {acc:.4f} lr {lr:.2e} {rate:,.0f} img/s ETA {_format_eta(eta)}")
    with loop.writers["train"].as_default(step=step):
        tf.summary.scalar("loss", loss)
        tf.summary.scalar("accuracy", acc)
        tf.summary.scalar("learning_rate", lr)
        tf.summary.scalar("images_per_sec", rate)
        tf.summary.scalar("step_time_ms", 1000.0 * config.global_batch_size / max(rate, 1e-9))
        scale = optimization.loss_scale_value(state.optimizer)
        if scale is not None:
            tf.summary.scalar("loss_scale", scale)


def run_evaluation(loop: Loop, step: int, epoch: int, validation: bool = False) -> dict:
    """Evaluate the validation or the test split; a line and the validation/test summaries."""
    loop.sync_bn_statistics()
    metrics = evaluate(loop.eval_step, loop.inputs.val_dataset if validation else loop.inputs.eval_dataset)
    _say(loop.chief, f"epoch {epoch + 1}/{loop.derived.epochs} {'validation' if validation else 'test'} "
                     f"loss {metrics['loss']:.4f} acc {metrics['accuracy']:.4f} "
                     f"top5 {metrics['top5_accuracy']:.4f} ({metrics['examples']} examples)")
    with loop.writers["validation" if validation else "test"].as_default(step=step):
        for key in ("loss", "accuracy", "top5_accuracy"):
            tf.summary.scalar(key, metrics[key])
    return metrics


# ----------------------------------------------------------------------------------------- finish
def final_evaluation(loop: Loop, state: TrainState, metrics: dict) -> tuple[dict, dict]:
    """The test-split metrics to report and, with a validation split, the model-selection facts.

    With validation the best-validation weights are restored first and the test split is evaluated
    (model selection never sees it); without, the last epoch's evaluation is the test split's.
    """
    step = int(state.step.numpy())
    if loop.inputs.val_dataset is None:
        if not metrics:  # Resumed a finished run: evaluate the restored weights.
            metrics = evaluate(loop.eval_step, loop.inputs.eval_dataset)
        return metrics, {}
    best = loop.best_saver.restore_latest()
    validation = {"best_checkpoint": best, "best_validation_loss": float(state.best_val_loss.numpy()),
                  "best_step": int(state.step.numpy()), "stopped_early": step < loop.derived.total_steps}
    _say(loop.chief, f"restored the best validation weights from {best}")
    return run_evaluation(loop, step, loop.derived.epochs - 1), validation


def build_summary(config: Config, derived: Derived, eval_metrics: dict, epoch_totals, step: int,
                  counters: Counters, wall_seconds: float, policy: str, xla: bool, parameters: int,
                  resumed_from: str | None, learning_rate_scale: float, validation: dict,
                  fingerprint: dict) -> dict:
    """summary.json: test-split metrics (test_*, and eval_* as before), the last epoch's training
    loss/accuracy (restored across restarts), throughput and the run's setup."""
    loss_sum, correct, count = epoch_totals
    test = {"accuracy": eval_metrics["accuracy"], "loss": eval_metrics["loss"],
            "top5_accuracy": eval_metrics["top5_accuracy"], "examples": eval_metrics["examples"]}
    return {
        **{f"test_{key}": value for key, value in test.items()},
        # The same test-split numbers under their older names, for scripts written against them.
        **{f"eval_{key}": value for key, value in test.items()},
        "train_loss": loss_sum / count if count else None,
        "train_accuracy": correct / count if count else None,
        "steps": step, "epochs": derived.epochs, "steps_per_epoch": derived.steps_per_epoch,
        "images_per_sec": counters.images_per_sec, "wall_seconds": wall_seconds,
        "num_replicas": derived.num_replicas, "precision": policy, "xla": xla,
        "strategy": config.strategy, "model": config.model, "parameters": parameters,
        "global_batch_size": config.global_batch_size, "resumed_from": resumed_from,
        "nan_rollbacks": counters.rollbacks, "learning_rate_scale": learning_rate_scale,
        **validation,
        **fingerprint,
    }
