"""The tf.function parts of training: the per-replica optimizer steps, the multi-step train loop
(what `strategy.run` executes, and what perf/benchmark times) and the evaluation step."""
from __future__ import annotations

from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from convmixer_dist import optimization
from convmixer_dist.data import pipeline as data
from convmixer_dist.config import Config

SUM = tf.distribute.ReduceOp.SUM

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
    mean, std = data.normalization(config)

    def forward_backward(images, labels, poison):
        """Gradients (summing to the global-batch mean) and (loss_sum, correct, count) of one batch;
        `labels`: int class ids, or float soft targets [N, classes] (MixUp/CutMix)."""
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
        return grads, [tf.reduce_sum(per_example), correct, tf.cast(tf.shape(labels)[0], tf.float32)]

    if xla:
        # Only forward+backward is compiled: compiling the update under a strategy fails on CPU.
        forward_backward = tf.function(forward_backward, jit_compile=True)

    def prepare(images, labels, micro):
        """--augment_on_device: augment + normalize the raw batch here; `micro` numbers the
        micro-batches of the run (the augmentation's step)."""
        if augmenter is None:
            return images, labels
        images, labels = augmenter(images, labels, step=micro)
        return data.normalize(images, mean, std), labels

    # One bucketed all-reduce of the gradient per optimizer step, then clipping, then the update.
    apply = optimization.make_apply_gradients(optimizer, variables, config.clip_norm,
                                              config.allreduce_bucket_mb, config.allreduce_dtype)

    def replica_step(images, labels, poison, step):
        grads, sums = forward_backward(*prepare(images, labels, step), poison)
        apply(grads)
        return sums

    def replica_accumulated_step(images, labels, poison, step):
        """`images`/`labels`: the K micro-batches of this replica, stacked on a leading axis."""
        grads, sums = forward_backward(*prepare(images[0], labels[0], step * accum), poison)
        for k in tf.range(1, accum):  # a graph loop: the graph does not grow with K
            more, more_sums = forward_backward(
                *prepare(images[k], labels[k], step * accum + tf.cast(k, tf.int64)), poison)
            grads = [g + m for g, m in zip(grads, more)]
            sums = [a + b for a, b in zip(sums, more_sums)]
        apply(grads)
        return sums

    return replica_step, replica_accumulated_step


def make_train_loop(strategy, model, optimizer, config: Config, xla: bool,
                    stop_flag: Callable | None = None) -> Callable:
    """A tf.function running `num_steps` training (optimizer) steps; returns summed (loss, correct,
    count) and the number of steps run: fewer than `num_steps` when a stop was requested, so a stop
    signal is honoured after the current step. `stop_flag()` (`preemption.StopSignal.local_flag`) is
    this worker's request as 0.0/1.0; each step's bookkeeping (loss, correct, count and that flag)
    crosses the replicas as one 4-vector, the step's only collective besides the gradient's, and
    every worker sees the same sum, so all of them stop after the same step.
    With `--grad_accum_steps=K` each optimizer step reads K micro-batches from the iterator (see
    `make_replica_steps`)."""
    accum = config.grad_accum_steps
    replica_step, replica_accumulated_step = make_replica_steps(model, optimizer, config, xla)
    stop_flag = stop_flag or (lambda: tf.constant(0.0))

    def with_stop_flag(step_fn):
        def run(*args):
            return tf.stack(step_fn(*args) + [tf.cast(stop_flag(), tf.float32)])
        return run

    @tf.function
    def train_loop(iterator, num_steps, first_step, nan_at_step):
        """`num_steps` steps from global step `first_step`; the step numbered `nan_at_step` (a
        fault-injection hook for tests, 0 = never) gets a NaN loss."""
        totals = tf.zeros([3])
        done = tf.constant(0, tf.int32)
        stop = tf.constant(False)
        for i in tf.range(num_steps):
            if stop:
                break
            step = first_step + tf.cast(i, tf.int64)
            poison = tf.where(step + 1 == nan_at_step, float("nan"), 1.0)
            if accum == 1:
                images, labels = next(iterator)
                per_replica = strategy.run(with_stop_flag(replica_step),
                                           args=(images, labels, poison, step))
            else:
                micro = [next(iterator) for _ in range(accum)]
                stacked = strategy.run(lambda *b: (tf.stack(b[0::2]), tf.stack(b[1::2])),
                                       args=tuple(x for pair in micro for x in pair))
                per_replica = strategy.run(with_stop_flag(replica_accumulated_step),
                                           args=(stacked[0], stacked[1], poison, step))
            summed = strategy.reduce(SUM, per_replica, axis=None)
            totals += summed[:3]
            stop = summed[3] > 0
            done += 1
        return tf.unstack(totals) + [tf.cast(done, tf.float32)]

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

