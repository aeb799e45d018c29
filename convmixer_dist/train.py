"""The training loop: `train_and_evaluate(config, strategy)` reads top to bottom.

input pipeline -> model & optimizer (in `strategy.scope()`) -> step functions -> checkpoint/resume ->
loop (train `--steps_per_loop` steps per tf.function call, evaluate each epoch) -> summary.json.
Side effects (TensorBoard summaries, progress lines, summary.json) come from the chief only; every
worker takes part in checkpoint saves.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from convmixer_dist import data, optimization, rundir
from convmixer_dist.checkpoint import CheckpointSaver
from convmixer_dist.config import Config, Derived, derive
from convmixer_dist.model import build_convmixer, count_params
from convmixer_dist.precision import resolve_precision
from convmixer_dist.strategy import device_kind, is_chief

SUM = tf.distribute.ReduceOp.SUM


class TrainingDiverged(RuntimeError):
    """The loss became non-finite (outside float16 loss-scale skips)."""


def create_model(config: Config) -> keras.Model:
    """The ConvMixer described by the config."""
    return build_convmixer(hidden_dim=config.hidden_dim, depth=config.depth,
                           kernel_size=config.kernel_size, patch_size=config.patch_size,
                           num_classes=config.num_classes, image_size=config.image_size,
                           activation=config.activation, dropout_rate=config.dropout_rate,
                           sync_bn=config.sync_bn)


def use_xla(config: Config, kind: str) -> bool:
    """XLA for the per-replica forward/backward: on GPUs by default, off on CPU (~7x slower there)."""
    return config.xla == "on" or (config.xla == "auto" and kind == "gpu")


def make_train_loop(strategy, model, optimizer, config: Config, derived: Derived, xla: bool) -> Callable:
    """A tf.function running `num_steps` training steps; returns summed (loss, correct, count)."""
    variables = model.trainable_variables
    global_batch = config.global_batch_size

    def forward_backward(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            targets = tf.one_hot(labels, config.num_classes)
            per_example = keras.losses.categorical_crossentropy(
                targets, logits, from_logits=True, label_smoothing=config.label_smoothing)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, variables)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels),
                                        tf.float32))
        return grads, tf.reduce_sum(per_example), correct

    if xla:
        # Only forward+backward is compiled: compiling the update under a strategy fails on CPU.
        forward_backward = tf.function(forward_backward, jit_compile=True)

    def replica_step(images, labels):
        grads, loss_sum, correct = forward_backward(images, labels)
        grads = optimization.prepare_gradients(grads, config.clip_norm, optimization.loss_scale(optimizer))
        optimizer.apply_gradients(zip(grads, variables))
        return loss_sum, correct, tf.cast(tf.shape(labels)[0], tf.float32)

    @tf.function
    def train_loop(iterator, num_steps):
        totals = [tf.constant(0.0), tf.constant(0.0), tf.constant(0.0)]
        for _ in tf.range(num_steps):
            images, labels = next(iterator)
            per_replica = strategy.run(replica_step, args=(images, labels))
            totals = [t + strategy.reduce(SUM, v, axis=None) for t, v in zip(totals, per_replica)]
        return totals

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
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        return _train_and_evaluate(config, strategy, chief, kind, policy, wall_start)
    finally:
        keras.mixed_precision.set_dtype_policy(previous_policy)


def _train_and_evaluate(config, strategy, chief, kind, policy, wall_start) -> dict:
    # Seeds python, numpy, TensorFlow and Keras first: tf.data's shuffle order depends on the global seed.
    keras.utils.set_random_seed(config.seed)

    # ---- input pipeline
    arrays = None if config.dataset == "synthetic" else data.load_arrays(config)
    sizes = (None, None) if arrays is None else (len(arrays["train"][0]), len(arrays["test"][0]))
    derived = derive(config, strategy.num_replicas_in_sync, *sizes)
    train_dataset, eval_dataset = data.distributed_datasets(strategy, config, derived, arrays)
    # Inputs are valid: only now does anything get written.
    rundir.prepare_model_dir(config, chief)

    # ---- model & optimizer
    with strategy.scope():
        model = create_model(config)
        optimizer = optimization.create_optimizer(config, derived.total_steps, policy)
        # Keras 3 creates slots lazily, which fails inside a distributed tf.function: build them now.
        optimizer.build(model.trainable_variables)
        step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_var)
    resolver = getattr(strategy, "cluster_resolver", None)
    task_id = int(getattr(resolver, "task_id", 0) or 0)
    saver = CheckpointSaver(checkpoint, config.model_dir, chief, task_id, config.keep_checkpoints)
    restored = saver.restore_latest()
    step = int(step_var.numpy())
    if restored:
        _say(chief, f"Resumed from {restored} at step {step}/{derived.total_steps}")

    # ---- update and eval steps
    xla = use_xla(config, kind)
    train_loop = make_train_loop(strategy, model, optimizer, config, derived, xla)
    eval_step = make_eval_step(strategy, model, config)

    # ---- summaries (chief only)
    if chief:
        train_writer = tf.summary.create_file_writer(os.path.join(config.model_dir, "train"))
        eval_writer = tf.summary.create_file_writer(os.path.join(config.model_dir, "eval"))
    else:
        train_writer = eval_writer = tf.summary.create_noop_writer()
    params = count_params(model)
    _say(chief, f"ConvMixer-{config.hidden_dim}/{config.depth} k{config.kernel_size} "
                f"p{config.patch_size}, {params:,} parameters; strategy={config.strategy} "
                f"replicas={derived.num_replicas} precision={policy} xla={'on' if xla else 'off'}; "
                f"{derived.total_steps} steps ({derived.epochs} epochs x {derived.steps_per_epoch}), "
                f"global batch {config.global_batch_size} ({derived.per_replica_batch_size}/replica)")

    # ---- loop
    iterator = iter(train_dataset)
    log_every = _log_period(config, derived)
    timed_images, timed_seconds = 0, 0.0
    window = np.zeros(3)
    train_totals = np.zeros(3)
    eval_metrics: dict = {}
    first_call = True
    while step < derived.total_steps:
        epoch = step // derived.steps_per_epoch
        epoch_end = min((epoch + 1) * derived.steps_per_epoch, derived.total_steps)
        window_start = time.time()
        while step < epoch_end:
            boundaries = [epoch_end, (step // log_every + 1) * log_every,
                          (step // config.checkpoint_every_steps + 1) * config.checkpoint_every_steps]
            n = min([step + config.steps_per_loop] + boundaries) - step
            lr = float(optimization.current_learning_rate(optimizer))
            started = time.time()
            totals = np.array([float(t) for t in train_loop(iterator, tf.constant(n, tf.int32))])
            seconds = time.time() - started
            step += n
            step_var.assign(step)
            if not math.isfinite(totals[0]) and policy != "mixed_float16":
                raise TrainingDiverged(f"the training loss became non-finite between steps "
                                       f"{step - n + 1} and {step}; the last good checkpoint is kept "
                                       f"in {saver.main_dir}")
            window += totals
            train_totals += totals
            if not first_call:  # The first call includes tracing and compilation.
                timed_images += n * config.global_batch_size
                timed_seconds += seconds
            first_call = False
            if step % log_every == 0 or step == epoch_end:
                elapsed = time.time() - window_start
                rate = timed_images / timed_seconds if timed_seconds else window[2] / max(elapsed, 1e-9)
                loss, acc = window[0] / max(window[2], 1), window[1] / max(window[2], 1)
                eta = (derived.total_steps - step) * config.global_batch_size / max(rate, 1e-9)
                _say(chief, f"epoch {epoch + 1}/{derived.epochs} step {step}/{derived.total_steps} "
                            f"loss {loss:.4f} acc {acc:.4f} lr {lr:.2e} {rate:,.0f} img/s "
                            f"ETA {_format_eta(eta)}")
                with train_writer.as_default(step=step):
                    tf.summary.scalar("loss", loss)
                    tf.summary.scalar("accuracy", acc)
                    tf.summary.scalar("learning_rate", lr)
                    tf.summary.scalar("images_per_sec", rate)
                    tf.summary.scalar("step_time_ms", 1000.0 * config.global_batch_size / max(rate, 1e-9))
                    scale = optimization.loss_scale_value(optimizer)
                    if scale is not None:
                        tf.summary.scalar("loss_scale", scale)
                window[:] = 0
                window_start = time.time()
            if step % config.checkpoint_every_steps == 0 and step < derived.total_steps:
                saver.save(step)
        eval_metrics = evaluate(eval_step, eval_dataset)
        _say(chief, f"epoch {epoch + 1}/{derived.epochs} eval loss {eval_metrics['loss']:.4f} "
                    f"acc {eval_metrics['accuracy']:.4f} top5 {eval_metrics['top5_accuracy']:.4f} "
                    f"({eval_metrics['examples']} examples)")
        with eval_writer.as_default(step=step):
            tf.summary.scalar("loss", eval_metrics["loss"])
            tf.summary.scalar("accuracy", eval_metrics["accuracy"])
            tf.summary.scalar("top5_accuracy", eval_metrics["top5_accuracy"])
    if not eval_metrics:  # Resumed a finished run: evaluate the restored weights.
        eval_metrics = evaluate(eval_step, eval_dataset)
    saver.save(step)
    for writer in (train_writer, eval_writer):
        writer.flush()

    summary = {
        "eval_accuracy": eval_metrics["accuracy"], "eval_loss": eval_metrics["loss"],
        "eval_top5_accuracy": eval_metrics["top5_accuracy"], "eval_examples": eval_metrics["examples"],
        "train_loss": train_totals[0] / train_totals[2] if train_totals[2] else None,
        "train_accuracy": train_totals[1] / train_totals[2] if train_totals[2] else None,
        "steps": step, "epochs": derived.epochs, "steps_per_epoch": derived.steps_per_epoch,
        "images_per_sec": timed_images / timed_seconds if timed_seconds else None,
        "wall_seconds": time.time() - wall_start,
        "num_replicas": derived.num_replicas, "precision": policy, "xla": xla,
        "strategy": config.strategy, "model": config.model, "parameters": count_params(model),
        "global_batch_size": config.global_batch_size, "resumed_from": restored,
        **weights_fingerprint(model),
    }
    return summary
