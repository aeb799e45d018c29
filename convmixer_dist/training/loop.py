"""The training loop: `train_and_evaluate(config, strategy)` composes small module-level functions
and reads top to bottom (the shape of flax's examples/imagenet/train.py):

prepare_inputs -> create_train_state (model, optimizer, step and the other checkpointed variables, in
`strategy.scope()`) -> savers (resume, or save step 0) -> make_train_loop / make_eval_step ->
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
import hashlib
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
from convmixer_dist.fused import resolve_kernels
from convmixer_dist.model import build_convmixer, count_params
from convmixer_dist.precision import resolve_precision
from convmixer_dist.preemption import PreemptionWatcher
from convmixer_dist.profiling import (ProfileWindow, check_profile_window, parse_profile_steps,
                                      start_profiler_server)
from convmixer_dist.strategy import device_kind, is_chief

SUM = tf.distribute.ReduceOp.SUM


class TrainingDiverged(RuntimeError):
    """The loss or the weights became non-finite (outside float16 loss-scale skips)."""


class Preempted(RuntimeError):
    """A termination signal arrived; a checkpoint was saved at the step in the message."""


def create_model(config: Config, kind: str | None = None) -> keras.Model:
    """The ConvMixer described by the config, with `--kernels` resolved for the device `kind` ("cpu"
    or "gpu"; default: "gpu" if TensorFlow sees one)."""
    if kind is None:
        kind = "gpu" if tf.config.list_logical_devices("GPU") else "cpu"
    return build_convmixer(hidden_dim=config.hidden_dim, depth=config.depth,
                           kernel_size=config.kernel_size, patch_size=config.patch_size,
                           num_classes=config.num_classes, image_size=config.image_size,
                           activation=config.activation, dropout_rate=config.dropout_rate,
                           sync_bn=config.sync_bn, kernels=resolve_kernels(config.kernels, kind))


def use_xla(config: Config, kind: str) -> bool:
    """XLA for the per-replica forward/backward: on GPUs by default, off on CPU (~7x slower there)."""
    return config.xla == "on" or (config.xla == "auto" and kind == "gpu")


def make_replica_steps(model, optimizer, config: Config, xla: bool) -> tuple[Callable, Callable]:
    """The per-replica optimizer step, `(images, labels, poison, step) -> (loss_sum, correct, count)`,
    for one batch and for `--grad_accum_steps=K` stacked micro-batches.

    With K micro-batches each optimizer step sums their gradients on each replica (each micro-batch
    loss is already divided by the whole global batch, so the sum is the mean over all K
    micro-batches), then clips and applies once: one all-reduce per optimizer step, and steps,
    schedules and checkpoints count optimizer steps.
    """
    variables = model.trainable_variables
    global_batch = config.global_batch_size
    accum = config.grad_accum_steps
    # --augment_on_device: the pipeline delivers raw batches; augment + normalize here, batched.
    augmenter = data.make_augmenter(config) if config.augment_on_device else None
    mean, std = data.NORMALIZATION[config.dataset]

    def forward_backward(images, labels, poison):
        """`labels`: int class ids, or float soft targets [N, classes] (MixUp/CutMix)."""
        if labels.dtype.is_integer:
            targets = tf.one_hot(labels, config.num_classes)
        else:
            targets, labels = labels, tf.argmax(labels, -1, output_type=tf.int32)
        with tf.GradientTape() as tape:
            logits = model(images, training=True) * poison  # poison: 1, or NaN for fault injection
            per_example = keras.losses.categorical_crossentropy(
                targets, logits, from_logits=True, label_smoothing=config.label_smoothing)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            if model.losses:  # once per optimizer step in total, spread over the micro-batches
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses)) / accum
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, variables)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels),
                                        tf.float32))
        return grads, tf.reduce_sum(per_example), correct

    if xla:
        # Only forward+backward is compiled: compiling the update under a strategy fails on CPU.
        forward_backward = tf.function(forward_backward, jit_compile=True)

    def micro_step(images, labels, poison, micro):
        """Gradients (summing to the global-batch mean) and sums of one micro-batch; `micro` numbers
        the micro-batches of the run (the on-device augmentation's step)."""
        if augmenter is not None:
            images, labels = augmenter(images, labels, step=micro)
            images = data.normalize(images, mean, std)
        grads, loss_sum, correct = forward_backward(images, labels, poison)
        return grads, loss_sum, correct, tf.cast(tf.shape(labels)[0], tf.float32)

    def apply(grads):
        grads = optimization.prepare_gradients(grads, config.clip_norm, optimization.loss_scale(optimizer))
        optimizer.apply_gradients(zip(grads, variables))

    def replica_step(images, labels, poison, step):
        grads, loss_sum, correct, count = micro_step(images, labels, poison, step)
        apply(grads)
        return loss_sum, correct, count

    def replica_accumulated_step(images, labels, poison, step):
        """`images`/`labels`: the K micro-batches of this replica, stacked on a leading axis."""
        grads, loss_sum, correct, count = micro_step(images[0], labels[0], poison, step * accum)
        for k in tf.range(1, accum):  # a graph loop: the graph does not grow with K
            more = micro_step(images[k], labels[k], poison, step * accum + tf.cast(k, tf.int64))
            grads = [g + m for g, m in zip(grads, more[0])]
            loss_sum, correct, count = loss_sum + more[1], correct + more[2], count + more[3]
        apply(grads)
        return loss_sum, correct, count

    return replica_step, replica_accumulated_step


def make_train_loop(strategy, model, optimizer, config: Config, xla: bool,
                    stop_flag: tf.Variable | None = None) -> Callable:
    """A tf.function running `num_steps` training (optimizer) steps; returns summed (loss, correct,
    count) and the number of steps run: fewer than `num_steps` when `stop_flag` (see
    preemption.stop_flag) is raised during the call, so a stop signal is honoured at the next step.
    With `--grad_accum_steps=K` each optimizer step reads K micro-batches from the iterator (see
    `make_replica_steps`)."""
    accum = config.grad_accum_steps
    replica_step, replica_accumulated_step = make_replica_steps(model, optimizer, config, xla)

    @tf.function
    def train_loop(iterator, num_steps, first_step, nan_at_step):
        """`num_steps` steps from global step `first_step`; the step numbered `nan_at_step` (a
        fault-injection hook for tests, 0 = never) gets a NaN loss."""
        totals = [tf.constant(0.0), tf.constant(0.0), tf.constant(0.0)]
        done = tf.constant(0, tf.int32)
        for i in tf.range(num_steps):
            if stop_requested():
                break
            step = first_step + tf.cast(i, tf.int64)
            poison = tf.where(step + 1 == nan_at_step, float("nan"), 1.0)
            if accum == 1:
                images, labels = next(iterator)
                per_replica = strategy.run(replica_step, args=(images, labels, poison, step))
            else:
                micro = [next(iterator) for _ in range(accum)]
                stacked = strategy.run(lambda *b: (tf.stack(b[0::2]), tf.stack(b[1::2])),
                                       args=tuple(x for pair in micro for x in pair))
                per_replica = strategy.run(replica_accumulated_step,
                                           args=(stacked[0], stacked[1], poison, step))
            totals = [t + strategy.reduce(SUM, v, axis=None) for t, v in zip(totals, per_replica)]
            done += 1
        return totals + [tf.cast(done, tf.float32)]

    stop_requested = preemption.make_stop_check(strategy, stop_flag)
    return train_loop


def make_eval_step(strategy, model, config: Config) -> Callable:
    """A tf.function returning summed (loss, top-1 correct, top-5 correct, count) of one batch."""
    top_k = min(5, config.num_classes)

    def replica_sums(images, labels):
        logits = model(images, training=False)
        per_example = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        top1 = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)
        topk = tf.cast(tf.math.in_top_k(labels, logits, top_k), tf.float32)
        return tf.stack([tf.reduce_sum(per_example), tf.reduce_sum(top1), tf.reduce_sum(topk),
                         tf.cast(tf.shape(labels)[0], tf.float32)])

    def replica_eval(images, labels):
        # At the end of the split some replicas receive an empty batch, which the oneDNN convolution
        # rejects; they contribute zeros instead.
        return tf.cond(tf.shape(labels)[0] > 0, lambda: replica_sums(images, labels),
                       lambda: tf.zeros([4]))

    @tf.function(reduce_retracing=True)
    def eval_step(images, labels):
        return strategy.reduce(SUM, strategy.run(replica_eval, args=(images, labels)), axis=None)

    return eval_step


def evaluate(eval_step: Callable, eval_dataset) -> dict:
    """Loss, top-1 and top-5 over the whole evaluation split (every example exactly once)."""
    totals = np.zeros(4)
    for images, labels in eval_dataset:
        totals += eval_step(images, labels).numpy()
    loss, top1, top5, count = totals
    return {"loss": loss / max(count, 1), "accuracy": top1 / max(count, 1),
            "top5_accuracy": top5 / max(count, 1), "examples": int(count)}


def weights_fingerprint(model: keras.Model) -> dict:
    """Checksums of the weights: sha256 of the bytes (exact) and the sum of |w| (for tolerances),
    and the sha256 of the trainable weights alone. Those are what training computes; the BatchNorm
    moving statistics beside them are averaged across replicas at every save, so a save at an extra
    step (a preemption) re-rounds their last bits without changing what is trained."""
    digest, trainable_digest = hashlib.sha256(), hashlib.sha256()
    trainable = {id(weight) for weight in model.trainable_weights}
    abs_sum = 0.0
    for weight in model.weights:
        value = np.asarray(keras.ops.convert_to_numpy(weight), dtype=np.float32)
        digest.update(value.tobytes())
        if id(weight) in trainable:
            trainable_digest.update(value.tobytes())
        abs_sum += float(np.abs(value.astype(np.float64)).sum())
    return {"weights_sha256": digest.hexdigest(), "weights_abs_sum": abs_sum,
            "trainable_weights_sha256": trainable_digest.hexdigest()}


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


def make_bn_statistics_sync(strategy, model: keras.Model) -> Callable[[], None]:
    """A function averaging BatchNorm moving mean/variance over all replicas (timm's `--dist-bn
    reduce`). Without --sync_bn each replica updates its own copy from its own batches; averaging
    before every evaluation and save makes evaluation, checkpoint and resume agree."""
    moving = [w for w in model.non_trainable_weights if "moving_" in w.path]
    if strategy.num_replicas_in_sync == 1 or not moving:
        return lambda: None

    @tf.function
    def sync():
        local = strategy.run(lambda: [tf.identity(w.value) for w in moving])
        for weight, value in zip(moving, local):
            weight.value.assign(strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None))

    return sync


def weights_finite(model: keras.Model) -> bool:
    """True when every weight is finite (checked before each save: never checkpoint a NaN)."""
    return bool(tf.reduce_all([tf.reduce_all(tf.math.is_finite(tf.cast(w.value, tf.float32)))
                               for w in model.weights]))


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


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a checkpoint holds, created in `strategy.scope()`; `checkpoint` saves it all."""

    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    step: tf.Variable  # Global optimizer step.
    lr_scale: tf.Variable  # Learning-rate multiplier; NaN rollbacks lower it.
    epoch_totals: tf.Variable  # Sums (loss, correct, count) of the current epoch, so a resumed run
    #                            reports the same numbers.
    best_val_loss: tf.Variable  # Early stopping: best validation loss so far ...
    epochs_without_gain: tf.Variable  # ... and epochs since it improved.
    checkpoint: tf.train.Checkpoint


def create_train_state(strategy, config: Config, derived: Derived, kind: str, policy: str) -> TrainState:
    """Model, optimizer (slots built) and the checkpointed counters, in the strategy's scope."""
    with strategy.scope():
        model = create_model(config, kind)
        lr_scale = tf.Variable(1.0, trainable=False, name="lr_scale")
        optimizer = optimization.create_optimizer(config, derived.total_steps, policy, lr_scale,
                                                  model.trainable_variables)
        # Keras 3 creates slots lazily, which fails inside a distributed tf.function: build them now.
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        epoch_totals = tf.Variable(tf.zeros(3, tf.float64), trainable=False, name="epoch_totals")
        best_val_loss = tf.Variable(float("inf"), dtype=tf.float64, trainable=False, name="best_val_loss")
        epochs_without_gain = tf.Variable(0, dtype=tf.int64, trainable=False, name="epochs_without_gain")
        # Dropout's random-number state is not part of a Keras model's TF checkpoint; saving it is
        # what lets a resumed run draw the same dropout masks as an uninterrupted one.
        rng = tf.train.Checkpoint(**{f"state{i}": v.value for i, v in enumerate(model.variables)
                                     if "seed_generator" in v.path})
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step,
                                         lr_scale=lr_scale, epoch_totals=epoch_totals, rng=rng,
                                         best_val_loss=best_val_loss,
                                         epochs_without_gain=epochs_without_gain)
    return TrainState(model, optimizer, step, lr_scale, epoch_totals, best_val_loss, epochs_without_gain,
                      checkpoint)


def create_savers(strategy, config: Config, chief: bool, checkpoint) -> tuple[CheckpointSaver, CheckpointSaver]:
    """The periodic checkpoints (--keep_checkpoints) and the best-validation one."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_id = int(getattr(resolver, "task_id", 0) or 0)
    saver = CheckpointSaver(checkpoint, config.model_dir, chief, task_id, config.keep_checkpoints)
    best_saver = CheckpointSaver(checkpoint, config.model_dir, chief, task_id, 1, subdir="best_checkpoint")
    return saver, best_saver


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
