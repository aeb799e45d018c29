"""What a checkpoint holds (`TrainState`: model, optimizer, step and the other counters), its savers,
the weights' fingerprint, and the BatchNorm statistics sync that makes evaluation, save and resume agree."""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from convmixer_dist import optimization
from convmixer_dist.checkpoint import CheckpointSaver
from convmixer_dist.config import Config, Derived
from convmixer_dist.model import create_model

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


def weights_finite(model: keras.Model) -> bool:
    """True when every weight is finite (checked before each save: never checkpoint a NaN)."""
    return bool(tf.reduce_all([tf.reduce_all(tf.math.is_finite(tf.cast(w.value, tf.float32)))
                               for w in model.weights]))


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


class TrainingDiverged(RuntimeError):
    """The loss or the weights became non-finite (outside float16 loss-scale skips)."""


class Checkpoints:
    """The periodic checkpoints (--keep_checkpoints) and the best-validation one of a TrainState.
    Every save averages the BatchNorm statistics first (every worker takes part)."""

    def __init__(self, strategy, config: Config, chief: bool, state: TrainState):
        resolver = getattr(strategy, "cluster_resolver", None)
        task_id = int(getattr(resolver, "task_id", 0) or 0)
        self.latest = CheckpointSaver(state.checkpoint, config.model_dir, chief, task_id,
                                      config.keep_checkpoints)
        self.best = CheckpointSaver(state.checkpoint, config.model_dir, chief, task_id, 1,
                                    subdir="best_checkpoint")
        self.model = state.model
        self.sync_bn_statistics = make_bn_statistics_sync(strategy, state.model)

    def save(self, step: int) -> None:
        """Average BatchNorm statistics, refuse non-finite weights (never checkpoint a NaN), save."""
        self.sync_bn_statistics()
        if not weights_finite(self.model):
            raise TrainingDiverged(f"the weights became non-finite by step {step}")
        self.latest.save(step)

    def save_best(self, step: int) -> None:
        self.sync_bn_statistics()
        self.best.save(step)
