"""The training loop: `train_and_evaluate(config, strategy)` reads top to bottom.

input pipeline -> model & optimizer (in `strategy.scope()`) -> step functions -> checkpoint/resume ->
loop (train `--steps_per_loop` steps per tf.function call, evaluate each epoch) -> summary.json.
Side effects (TensorBoard summaries, progress lines, summary.json) come from the chief only; every
worker takes part in checkpoint saves.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from convmixer_dist import data, image_folder, optimization, rundir, tfrecord
from convmixer_dist.checkpoint import CheckpointSaver
from convmixer_dist.config import Config, Derived, derive
from convmixer_dist.fused import resolve_kernels
from convmixer_dist.model import build_convmixer, count_params
from convmixer_dist.precision import resolve_precision
from convmixer_dist import preemption
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


def make_train_loop(strategy, model, optimizer, config: Config, derived: Derived, xla: bool,
                    stop_flag: tf.Variable | None = None) -> Callable:
    """A tf.function running `num_steps` training (optimizer) steps; returns summed (loss, correct,
    count) and the number of steps run: fewer than `num_steps` when `stop_flag` (see
    preemption.stop_flag) is raised during the call, so a stop signal is honoured at the next step.

    With `--grad_accum_steps=K` each optimizer step reads K micro-batches from the iterator, sums
    their gradients on each replica (each micro-batch loss is already divided by the whole global
    batch, so the sum is the mean over all K micro-batches), then clips and applies once: one
    all-reduce per optimizer step, and steps, schedules and checkpoints count optimizer steps.
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
    """Checksums of the weights: sha256 of the bytes (exact) and the sum of |w| (for tolerances)."""
    digest = hashlib.sha256()
    abs_sum = 0.0
    for weight in model.weights:
        value = np.asarray(keras.ops.convert_to_numpy(weight), dtype=np.float32)
        digest.update(value.tobytes())
        abs_sum += float(np.abs(value.astype(np.float64)).sum())
    return {"weights_sha256": digest.hexdigest(), "weights_abs_sum": abs_sum}


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _log_period(config: Config, derived: Derived) -> int:
    if config.log_every_steps:
        return config.log_every_steps
    # About ten lines per epoch, at loop boundaries so logging never shortens a tf.function call.
    tenth = max(1, min(derived.steps_per_epoch, derived.total_steps) // 10)
    return max(1, round(tenth / config.steps_per_loop)) * config.steps_per_loop


class Throughput:
    """Images per second of the whole run (summary.json) and of each logging window (progress line,
    TensorBoard `images_per_sec`/`step_time_ms`), so a slowdown shows in the curves instead of
    vanishing in an average since the start. The first call (tracing, compilation) counts in neither
    average, except as the rate of a window that holds nothing else."""

    def __init__(self) -> None:
        self.run_images, self.run_seconds = 0, 0.0
        self.window_images, self.window_seconds = 0, 0.0
        self.last_call_rate = 0.0
        self.calls = 0

    def add(self, images: int, seconds: float) -> None:
        """Record one loop call that trained `images` images in `seconds`."""
        self.calls += 1
        self.last_call_rate = images / max(seconds, 1e-9)
        if self.calls == 1:
            return
        self.run_images += images
        self.run_seconds += seconds
        self.window_images += images
        self.window_seconds += seconds

    def window_rate(self) -> float:
        """The rate since the previous `window_rate` call (then a new window starts)."""
        rate = (self.window_images / self.window_seconds if self.window_seconds
                else self.last_call_rate)
        self.window_images, self.window_seconds = 0, 0.0
        return rate

    @property
    def run_rate(self) -> float | None:
        """The rate over the whole run (None before a second call)."""
        return self.run_images / self.run_seconds if self.run_seconds else None


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


def _train_and_evaluate(config, strategy, chief, kind, policy, wall_start) -> dict:
    # Seeds python, numpy, TensorFlow and Keras first: tf.data's shuffle order depends on the global seed.
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()

    # ---- input pipeline (validated before anything is written)
    arrays = None if config.dataset == "synthetic" else data.load_arrays(config)
    full_train, eval_size = data.split_sizes(config, arrays)
    # --validation_fraction: a seeded held-out part of the training split, evaluated each epoch.
    split_ids = data.validation_split(config, full_train)
    train_ids, val_ids = split_ids if split_ids else (None, None)
    derived = derive(config, strategy.num_replicas_in_sync,
                     full_train if train_ids is None else len(train_ids), eval_size)
    data.augment_spec(config).validate()
    profile_warning = check_profile_window(parse_profile_steps(config.profile_steps), derived.total_steps)
    if profile_warning:
        _say(chief, profile_warning)
    eval_dataset = data.eval_dataset(strategy, config, derived, arrays)
    val_dataset = (None if val_ids is None
                   else data.eval_dataset(strategy, config, derived, arrays, split="val", ids=val_ids))
    preemption.start_writing()  # A stop signal before this point exits at once (nothing written).
    moved = rundir.prepare_model_dir(config, chief)
    if moved:
        _say(chief, f"--overwrite: moved the previous run to {moved}")
    if chief and arrays and arrays.get("class_names"):
        image_folder.save_class_names(config.model_dir, arrays["class_names"])

    # ---- model, optimizer, checkpoint
    with strategy.scope():
        model = create_model(config, kind)
        lr_scale = tf.Variable(1.0, trainable=False, name="lr_scale")
        optimizer = optimization.create_optimizer(config, derived.total_steps, policy, lr_scale,
                                                  model.trainable_variables)
        # Keras 3 creates slots lazily, which fails inside a distributed tf.function: build them now.
        optimizer.build(model.trainable_variables)
        step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        # Sums (loss, correct, count) of the current epoch, so a resumed run reports the same numbers.
        epoch_totals = tf.Variable(tf.zeros(3, tf.float64), trainable=False, name="epoch_totals")
        # Early stopping state: best validation loss so far and epochs since it improved.
        best_val_loss = tf.Variable(float("inf"), dtype=tf.float64, trainable=False, name="best_val_loss")
        epochs_without_gain = tf.Variable(0, dtype=tf.int64, trainable=False, name="epochs_without_gain")
        # Dropout's random-number state is not part of a Keras model's TF checkpoint; saving it is
        # what lets a resumed run draw the same dropout masks as an uninterrupted one.
        rng = tf.train.Checkpoint(**{f"state{i}": v.value for i, v in enumerate(model.variables)
                                     if "seed_generator" in v.path})
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_var,
                                         lr_scale=lr_scale, epoch_totals=epoch_totals, rng=rng,
                                         best_val_loss=best_val_loss,
                                         epochs_without_gain=epochs_without_gain)
    resolver = getattr(strategy, "cluster_resolver", None)
    task_id = int(getattr(resolver, "task_id", 0) or 0)
    saver = CheckpointSaver(checkpoint, config.model_dir, chief, task_id, config.keep_checkpoints)
    best_saver = CheckpointSaver(checkpoint, config.model_dir, chief, task_id, 1, subdir="best_checkpoint")
    restored = saver.restore_latest()
    if restored:
        _say(chief, f"Resumed from {restored} at step {int(step_var.numpy())}/{derived.total_steps}")
    else:
        saver.save(0)  # A starting point for --nan_policy=rollback and for resume.

    # ---- update and eval steps
    xla = use_xla(config, kind)
    train_loop = make_train_loop(strategy, model, optimizer, config, derived, xla,
                                 stop_flag=preemption.stop_flag())
    eval_step = make_eval_step(strategy, model, config)

    # ---- summaries (chief only)
    if chief:
        train_writer = tf.summary.create_file_writer(os.path.join(config.model_dir, "train"))
        eval_writer = tf.summary.create_file_writer(os.path.join(config.model_dir, "eval"))
        val_writer = (tf.summary.create_file_writer(os.path.join(config.model_dir, "validation"))
                      if val_dataset is not None else tf.summary.create_noop_writer())
    else:
        train_writer = eval_writer = val_writer = tf.summary.create_noop_writer()
    _say(chief, f"ConvMixer-{config.hidden_dim}/{config.depth} k{config.kernel_size} "
                f"p{config.patch_size}, {count_params(model):,} parameters; strategy={config.strategy} "
                f"replicas={derived.num_replicas} precision={policy} xla={'on' if xla else 'off'}; "
                f"{derived.total_steps} steps ({derived.epochs} epochs x {derived.steps_per_epoch}), "
                f"global batch {config.global_batch_size} ({derived.per_replica_batch_size}/replica)")

    sync_bn_statistics = make_bn_statistics_sync(strategy, model)

    def save(step: int) -> None:
        sync_bn_statistics()
        if not weights_finite(model):
            raise TrainingDiverged(f"the weights became non-finite by step {step}")
        saver.save(step)

    def log_train(step, epoch, window, lr, rate):
        loss, acc = window[0] / max(window[2], 1), window[1] / max(window[2], 1)
        eta = (derived.total_steps - step) * config.global_batch_size / max(rate, 1e-9)
        _say(chief, f"epoch {epoch + 1}/{derived.epochs} step {step}/{derived.total_steps} "
                    f"loss {loss:.4f} acc {acc:.4f} lr {lr:.2e} {rate:,.0f} img/s ETA {_format_eta(eta)}")
        with train_writer.as_default(step=step):
            tf.summary.scalar("loss", loss)
            tf.summary.scalar("accuracy", acc)
            tf.summary.scalar("learning_rate", lr)
            tf.summary.scalar("images_per_sec", rate)
            tf.summary.scalar("step_time_ms", 1000.0 * config.global_batch_size / max(rate, 1e-9))
            scale = optimization.loss_scale_value(optimizer)
            if scale is not None:
                tf.summary.scalar("loss_scale", scale)

    def run_eval(step, epoch, validation: bool = False) -> dict:
        sync_bn_statistics()
        metrics = evaluate(eval_step, val_dataset if validation else eval_dataset)
        _say(chief, f"epoch {epoch + 1}/{derived.epochs} {'validation' if validation else 'eval'} "
                    f"loss {metrics['loss']:.4f} acc {metrics['accuracy']:.4f} "
                    f"top5 {metrics['top5_accuracy']:.4f} ({metrics['examples']} examples)")
        with (val_writer if validation else eval_writer).as_default(step=step):
            for key in ("loss", "accuracy", "top5_accuracy"):
                tf.summary.scalar(key, metrics[key])
        return metrics

    # ---- profiling (chief only)
    profile = ProfileWindow(config.model_dir, parse_profile_steps(config.profile_steps),
                            config.profile_host_tracer_level, config.profile_python_tracer_level,
                            enabled=chief)
    if config.profiler_port and chief:
        start_profiler_server(config.profiler_port)
        _say(chief, f"profiler server on port {config.profiler_port}: capture from TensorBoard's "
                    f"Profile tab with grpc://HOSTNAME:{config.profiler_port}")

    # ---- loop
    log_every = _log_period(config, derived)
    timing = Throughput()
    nan_at_step = config.fault_inject_nan_at_step
    eval_metrics: dict = {}
    rollbacks = 0

    def train_until_done(watcher: PreemptionWatcher) -> dict:
        nonlocal nan_at_step
        step = int(step_var.numpy())
        iterator = iter(data.train_dataset(strategy, config, derived, arrays, step, ids=train_ids))
        metrics: dict = {}
        while step < derived.total_steps:
            epoch = step // derived.steps_per_epoch
            epoch_end = min((epoch + 1) * derived.steps_per_epoch, derived.total_steps)
            if step == epoch * derived.steps_per_epoch:
                epoch_totals.assign(tf.zeros(3, tf.float64))
            window = np.zeros(3)
            while step < epoch_end:
                boundaries = [epoch_end, (step // log_every + 1) * log_every,
                              (step // config.checkpoint_every_steps + 1) * config.checkpoint_every_steps]
                if profile.enabled:  # One step per call inside the window: one marker per step.
                    boundaries += [profile.steps[0], step + 1 if profile.inside(step) else profile.steps[1]]
                n = min([b for b in [step + config.steps_per_loop] + boundaries if b > step]) - step
                lr = float(optimization.current_learning_rate(optimizer))
                started = time.time()
                with profile.step(step, n):
                    *totals, done = [float(t) for t in train_loop(
                        iterator, tf.constant(n, tf.int32), tf.constant(step, tf.int64),
                        tf.constant(nan_at_step, tf.int64))]
                seconds = time.time() - started
                totals, n = np.array(totals), int(done)  # n < requested: stopped by a signal
                if step < nan_at_step <= step + n:
                    nan_at_step = 0  # The injected fault fires once per process.
                if not math.isfinite(totals[0]) and policy != "mixed_float16":
                    raise TrainingDiverged(f"the training loss became non-finite between steps "
                                           f"{step + 1} and {step + n}")
                step += n
                step_var.assign(step)
                epoch_totals.assign_add(totals)
                window += totals
                timing.add(n * config.global_batch_size, seconds)
                if n and (step % log_every == 0 or step == epoch_end):
                    log_train(step, epoch, window, lr, timing.window_rate())
                    window[:] = 0
                if watcher.should_stop():
                    save(step)
                    raise Preempted(f"stopped by signal at step {step}; checkpoint saved in "
                                    f"{saver.main_dir}, rerun the same command to resume")
                # Checkpoints at an epoch's end wait for its evaluation (below), so a resumed run
                # never skips an evaluation.
                if step % config.checkpoint_every_steps == 0 and step < epoch_end:
                    save(step)
            metrics = run_eval(step, epoch, validation=val_dataset is not None)
            stop_early = False
            if val_dataset is not None:
                if metrics["loss"] < float(best_val_loss.numpy()):
                    best_val_loss.assign(metrics["loss"])
                    epochs_without_gain.assign(0)
                    sync_bn_statistics()
                    best_saver.save(step)
                else:
                    epochs_without_gain.assign_add(1)
                patience = config.early_stopping_patience
                stop_early = bool(patience) and int(epochs_without_gain.numpy()) >= patience
            if stop_early or step % config.checkpoint_every_steps == 0 or step == derived.total_steps:
                save(step)
            if stop_early:
                _say(chief, f"early stopping at step {step}: no lower validation loss for "
                            f"{config.early_stopping_patience} epochs")
                return metrics
        return metrics

    # A corrupt image surfaces as a decode error mid-run; name the file in one line.
    if config.dataset == "image_folder":
        corrupt_files = image_folder.reporting_corrupt_files(list(arrays["train"][0]) + list(arrays["test"][0]))
    elif config.dataset == "tfrecord":
        corrupt_files = tfrecord.reporting_record_errors(config.data_dir)
    else:
        corrupt_files = contextlib.nullcontext()
    with PreemptionWatcher(strategy) as watcher, corrupt_files:
        while True:
            try:
                eval_metrics = train_until_done(watcher)
                break
            except TrainingDiverged as err:
                if config.nan_policy != "rollback" or rollbacks >= config.nan_max_rollbacks:
                    raise TrainingDiverged(f"{err}; the last good checkpoint is kept in "
                                           f"{saver.main_dir}") from None
                rollbacks += 1
                path = saver.restore_latest()
                lr_scale.assign(lr_scale * config.nan_lr_factor)
                _say(chief, f"warning: {err}; rolled back to {path} (step {int(step_var.numpy())}) "
                            f"with learning rate x{float(lr_scale.numpy()):g} "
                            f"(rollback {rollbacks}/{config.nan_max_rollbacks})")
    profile.close()
    step = int(step_var.numpy())
    stopped_early = step < derived.total_steps
    validation = {}
    if val_dataset is not None:
        # Model selection on validation only: restore the best weights, then report the test split.
        best = best_saver.restore_latest()
        validation = {"best_checkpoint": best, "best_validation_loss": float(best_val_loss.numpy()),
                      "best_step": int(step_var.numpy()), "stopped_early": stopped_early}
        _say(chief, f"restored the best validation weights from {best}")
        eval_metrics = run_eval(step, derived.epochs - 1)
    elif not eval_metrics:  # Resumed a finished run: evaluate the restored weights.
        eval_metrics = evaluate(eval_step, eval_dataset)
    for writer in (train_writer, eval_writer, val_writer):
        writer.flush()

    totals = epoch_totals.numpy()
    return {
        "eval_accuracy": eval_metrics["accuracy"], "eval_loss": eval_metrics["loss"],
        "eval_top5_accuracy": eval_metrics["top5_accuracy"], "eval_examples": eval_metrics["examples"],
        # Mean over the last epoch's steps (restored across restarts).
        "train_loss": totals[0] / totals[2] if totals[2] else None,
        "train_accuracy": totals[1] / totals[2] if totals[2] else None,
        "steps": step, "epochs": derived.epochs, "steps_per_epoch": derived.steps_per_epoch,
        "images_per_sec": timing.run_rate,
        "wall_seconds": time.time() - wall_start,
        "num_replicas": derived.num_replicas, "precision": policy, "xla": xla,
        "strategy": config.strategy, "model": config.model, "parameters": count_params(model),
        "global_batch_size": config.global_batch_size, "resumed_from": restored,
        "nan_rollbacks": rollbacks, "learning_rate_scale": float(lr_scale.numpy()),
        **validation,
        **weights_fingerprint(model),
    }
