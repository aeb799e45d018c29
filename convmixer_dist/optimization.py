"""Optimizer creation and the cross-replica gradient fixes Keras 3 needs under tf.distribute.

Keras 3 optimizers all-reduce (sum) gradients inside `apply_gradients`, but after their own clipping
and, for LossScaleOptimizer, after judging "finite" from the *local* gradients. Two consequences this
module handles:
- global-norm clipping must see the summed gradient, not one replica's share: we all-reduce, clip,
  and hand each replica `sum / replicas` (the optimizer's own sum restores the clipped total);
- with float16 loss scaling, one replica's Inf must make every replica skip the step, or the others
  apply it and poison the mirrored weights (a Keras 3 bug, docs/keras-under-tf-distribute.md):
  replicas agree on non-finite first.
"""
from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from convmixer_dist.config import Config
from convmixer_dist.precision import wrap_optimizer
from convmixer_dist.schedule import create_schedule


def create_optimizer(config: Config, total_steps: int, policy: str, lr_scale=None,
                     variables: Sequence | None = None) -> keras.optimizers.Optimizer:
    """AdamW with the configured schedule and epsilon (PyTorch's 1e-8 by default); loss-scaled for fp16.

    `lr_scale` (a variable) multiplies the schedule; NaN rollbacks lower it. With
    `--wd_exclude_bias_bn`, the 1-D parameters among `variables` (biases, BatchNorm gamma/beta) get no
    weight decay, as timm's `param_groups_weight_decay`; call before the optimizer is built.
    """
    schedule = create_schedule(config.lr_schedule, config.learning_rate, total_steps,
                               config.warmup_steps, lr_scale)
    inner = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=config.weight_decay,
                                   beta_1=0.9, beta_2=0.999, epsilon=config.adam_epsilon)
    if config.wd_exclude_bias_bn:
        if variables is None:
            raise ValueError("--wd_exclude_bias_bn needs the model's variables")
        inner.exclude_from_weight_decay(var_list=no_decay_variables(variables))
    return wrap_optimizer(inner, policy)


def no_decay_variables(variables: Sequence) -> list:
    """The parameters timm keeps out of weight decay: every one with fewer than 2 dimensions
    (biases, BatchNorm gamma and beta; the convolution and dense kernels keep their decay)."""
    return [v for v in variables if len(v.shape) <= 1]


def loss_scale(optimizer: keras.optimizers.Optimizer):
    """The current dynamic loss scale, or None without loss scaling."""
    return getattr(optimizer, "dynamic_scale", None)


def loss_scale_value(optimizer: keras.optimizers.Optimizer) -> float | None:
    """The loss scale as a Python float (for summaries), or None."""
    scale = loss_scale(optimizer)
    return None if scale is None else float(tf.convert_to_tensor(scale.value))


def current_learning_rate(optimizer: keras.optimizers.Optimizer):
    """The learning rate the next step uses (through a LossScaleOptimizer wrapper too)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return inner.learning_rate


def prepare_gradients(grads: list, clip_norm: float, scale) -> list:
    """Per-replica gradients -> what to pass to `apply_gradients` (called inside `strategy.run`).

    `scale` is the loss scale the gradients carry (None without loss scaling).
    """
    ctx = tf.distribute.get_replica_context()
    replicas = ctx.num_replicas_in_sync
    if clip_norm > 0:
        summed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        if scale is not None:
            summed = [g / tf.cast(scale, g.dtype) for g in summed]
        # A non-finite norm yields NaN gradients: still non-finite, so the loss-scale skip still fires.
        clipped, _ = tf.clip_by_global_norm(summed, clip_norm)
        if scale is not None:
            clipped = [g * tf.cast(scale, g.dtype) for g in clipped]
        # Every replica now holds the same clipped sum; the optimizer sums replicas again.
        return [g / replicas for g in clipped]
    if scale is not None and replicas > 1:
        local_bad = tf.cast(tf.logical_not(tf.reduce_all(
            [tf.reduce_all(tf.math.is_finite(g)) for g in grads])), tf.float32)
        any_bad = ctx.all_reduce(tf.distribute.ReduceOp.SUM, local_bad) > 0
        poison = tf.where(any_bad, float("nan"), 1.0)
        return [g * tf.cast(poison, g.dtype) for g in grads]
    return grads
