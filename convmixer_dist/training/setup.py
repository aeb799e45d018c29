"""The set-up of a training run, before its loop (training/loop.py): the process-wide settings, the
run directory, the train state (resumed, or step 0 as the first rollback target), the step functions,
the report and the profile window."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import keras
import tensorflow as tf

from convmixer_dist import resume_check, rundir
from convmixer_dist.data import image_folder
from convmixer_dist.config import Config
from convmixer_dist.model import count_params
from convmixer_dist.precision import use_xla
from convmixer_dist.profiling import ProfileWindow, check_window_after_resume, start_profiler_server
from convmixer_dist.strategy import device_kind, is_chief
from convmixer_dist.training.inputs import Inputs
from convmixer_dist.training.report import Report, describe_run
from convmixer_dist.training.state import Checkpoints, TrainState, create_train_state
from convmixer_dist.training.steps import make_eval_step, make_train_loop


def _op_determinism_enabled() -> bool:
    """Whether `tf.config.experimental.enable_op_determinism()` is in force (no public getter)."""
    from tensorflow.python.framework import config as tf_config

    return tf_config.is_op_determinism_enabled()


def _disable_op_determinism() -> None:
    """Undo `enable_op_determinism` (TensorFlow has no public function for it)."""
    from tensorflow.python.framework import config as tf_config

    tf_config.disable_op_determinism()


@contextlib.contextmanager
def process_settings(config: Config, policy: str) -> Iterator[None]:
    """Sets the precision `policy` (the plan's) as Keras's dtype policy, the seeds and op determinism;
    afterwards the process-wide settings go back to what the caller had and the run lock (taken by
    rundir.prepare_model_dir on the chief) is released."""
    previous_policy = keras.mixed_precision.dtype_policy()
    was_deterministic = _op_determinism_enabled()
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        # Seeds python, numpy, TensorFlow and Keras first: tf.data's shuffle order depends on the global seed.
        keras.utils.set_random_seed(config.seed)
        if config.deterministic:
            tf.config.experimental.enable_op_determinism()
        yield
    finally:
        keras.mixed_precision.set_dtype_policy(previous_policy)
        rundir.release_run_lock(config.model_dir)
        if not was_deterministic:
            _disable_op_determinism()


def stopped_early(config: Config, state: TrainState, validation: bool) -> bool:
    """Whether the train state records an early stop (--early_stopping_patience epochs without a
    lower validation loss): such a run is finished, like one that reached its last step."""
    patience = config.early_stopping_patience
    return validation and bool(patience) and int(state.epochs_without_gain.numpy()) >= patience


@dataclasses.dataclass(frozen=True)
class Run:
    """What the loop needs besides the train state; fixed for the whole run."""

    config: Config
    inputs: Inputs
    xla: bool
    parameters: int
    train_loop: Callable
    eval_step: Callable
    checkpoints: Checkpoints
    report: Report
    profile: ProfileWindow
    restored: str | None  # The checkpoint resumed from.


def set_up(config: Config, strategy, policy: str, inputs: Inputs, profile_window: tuple[int, int] | None,
           stop) -> tuple[Run, TrainState]:
    """Run directory, train state (resumed, or saved at step 0), step functions (the train loop
    sums `stop.local_flag` with every step's bookkeeping), report, profiler."""
    chief, derived = is_chief(strategy), inputs.derived
    state = create_train_state(strategy, config, derived, device_kind(strategy), policy)
    changes = resume_check.check_resume(config, state.checkpoint)  # Before anything is written.
    moved = rundir.prepare_model_dir(config, chief)
    report = Report(config, derived, chief, validation=inputs.val_dataset is not None)
    if moved:
        report.say(f"--overwrite: moved the previous run to {moved}")
    for line in changes:
        report.say(line)
    if chief and inputs.class_names():
        image_folder.save_class_names(config.model_dir, inputs.class_names())

    checkpoints = Checkpoints(strategy, config, chief, state)
    restored = checkpoints.latest.restore_latest()
    if restored:
        report.say(f"Resumed from {restored} at step {int(state.step.numpy())}/{derived.total_steps}")
        if stopped_early(config, state, inputs.val_dataset is not None):
            report.say(f"the run stopped early ({int(state.epochs_without_gain.numpy())} epochs without a "
                       "lower validation loss): it is finished, nothing more is trained (a larger "
                       "--early_stopping_patience continues it)")
        warning = check_window_after_resume(profile_window, int(state.step.numpy()))
        if warning:
            report.say(warning)
    else:
        checkpoints.latest.save(0)

    xla = use_xla(config, device_kind(strategy))
    report.say(describe_run(config, derived, state.model, policy, xla))
    train_loop = make_train_loop(strategy, state.model, state.optimizer, config, xla,
                                 stop_flag=stop.local_flag)
    profile = ProfileWindow(config.model_dir, profile_window, config.profile_host_tracer_level,
                            config.profile_python_tracer_level, enabled=chief)
    if config.profiler_port and chief:
        start_profiler_server(config.profiler_port)
        report.say(f"profiler server on port {config.profiler_port}: capture from TensorBoard's "
                   f"Profile tab with grpc://HOSTNAME:{config.profiler_port}")
    run = Run(config, inputs, xla, count_params(state.model), train_loop,
              make_eval_step(strategy, state.model, config), checkpoints, report, profile, restored)
    return run, state
