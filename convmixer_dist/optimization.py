"""Optimizer creation and the gradient path under tf.distribute: one cross-replica reduction of the
gradient per optimizer step, in buckets, then clipping, then the update.

Keras 3 optimizers all-reduce (sum) the gradients inside `apply_gradients`, one variable after the
other in variable order, after their own clipping and, for LossScaleOptimizer, after judging "finite"
from the *local* gradients. Used as it is, that costs a second full all-reduce whenever global-norm
clipping needs the summed gradient first, and it starts with the first layer, whose gradient the
backward pass produces last. So the training step reduces the gradient itself and turns Keras' own
reduction off (`skip_gradient_aggregation`):
- buckets of about `--allreduce_bucket_mb` are formed from the last layer to the first (the order
  the backward pass produces them), each one concatenated and all-reduced as one collective, so the
  reduction of the late layers can run while the early layers' gradients are still being computed;
- `--allreduce_dtype` casts each bucket for the reduction (bfloat16/float16 halve the bytes sent) and
  back to the gradient's dtype;
- global-norm clipping then sees the summed gradient, on every replica the same;
- with float16 loss scaling every replica holds the same summed gradient, so one replica's Inf or
  NaN is every replica's (an Inf plus anything finite stays Inf, NaN stays NaN) and all of them skip
  the step together: no separate agreement is needed.
"""
from __future__ import annotations

from typing import Callable, Sequence

import keras
import numpy as np
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


def skip_gradient_aggregation(optimizer: keras.optimizers.Optimizer) -> None:
    """Turn off the cross-replica sum Keras 3 performs inside `apply_gradients` (this optimizer
    instance only, and the one a LossScaleOptimizer wraps): the training step hands it gradients
    that are already summed over all replicas.

    Keras 3 has no public switch for this; the sum is the TensorFlow backend's
    `_all_reduce_sum_gradients` method, replaced here on the instance. If a Keras release renames
    it, this raises instead of silently summing twice (the tests pin the count of reductions).
    """
    for opt in (optimizer, getattr(optimizer, "inner_optimizer", None)):
        if opt is None:
            continue
        if not callable(getattr(opt, "_all_reduce_sum_gradients", None)):
            raise RuntimeError(f"{type(opt).__name__} has no _all_reduce_sum_gradients: this Keras "
                               f"version ({keras.__version__}) reduces gradients differently; "
                               "convmixer_dist.optimization must be adapted to it")
        opt._all_reduce_sum_gradients = list  # noqa: SLF001 - see the docstring


FIRST_BUCKET_BYTES = 2 ** 20  # as PyTorch DDP: a small first bucket starts the reduction early


def gradient_buckets(sizes: Sequence[int], bucket_bytes: int) -> list[list[int]]:
    """Positions of the gradients in each bucket, in the order they are reduced: from the last
    variable to the first (the backward pass produces the last layer's gradient first). A bucket
    is closed when the next gradient would take it past its cap (a gradient larger than that is a
    bucket of its own): the first bucket's cap is min(`FIRST_BUCKET_BYTES`, `bucket_bytes`), so the
    first collective can start early in the backward pass even with large buckets, every later
    one's `bucket_bytes`; `bucket_bytes <= 0` is one bucket for everything."""
    buckets: list[list[int]] = []
    filled = 0
    for position in reversed(range(len(sizes))):
        cap = min(FIRST_BUCKET_BYTES, bucket_bytes) if len(buckets) <= 1 else bucket_bytes
        if not buckets or (bucket_bytes > 0 and filled + sizes[position] > cap):
            buckets.append([])
            filled = 0
        buckets[-1].append(position)
        filled += sizes[position]
    return buckets


GRADIENT_SCOPE = "gradient_allreduce"  # names the gradient's collectives in graphs and profiles


def reduce_gradients(grads: list, bucket_bytes: int, dtype: str = "float32") -> list:
    """The gradients summed over all replicas (inside `strategy.run`): one all-reduce per bucket
    (see `gradient_buckets`; sizes counted in `dtype`, the bytes sent), each bucket flattened,
    cast to `dtype`, reduced and cast back to the gradients' dtype. None entries stay None."""
    ctx = tf.distribute.get_replica_context()
    wire = tf.as_dtype(dtype)
    present = [i for i, g in enumerate(grads) if g is not None]
    tensors = {i: tf.convert_to_tensor(grads[i]) for i in present}
    elements = [int(np.prod(tensors[i].shape)) for i in present]
    reduced = list(grads)
    for bucket in gradient_buckets([n * wire.size for n in elements], bucket_bytes):
        members = [present[b] for b in bucket]
        flat = tf.concat([tf.reshape(tf.cast(tensors[i], wire), [-1]) for i in members], axis=0)
        with tf.name_scope(GRADIENT_SCOPE):
            summed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, flat)
        parts = tf.split(summed, [elements[b] for b in bucket], axis=0)
        for i, part in zip(members, parts):
            reduced[i] = tf.cast(tf.reshape(part, tensors[i].shape), tensors[i].dtype)
    return reduced


def prepare_gradients(grads: list, clip_norm: float, scale, bucket_bytes: int = 0,
                      dtype: str = "float32") -> list:
    """Per-replica gradients -> the summed (and, with `clip_norm > 0`, clipped) gradient that every
    replica passes to an optimizer whose own reduction is off (`skip_gradient_aggregation`).
    Called inside `strategy.run`; `scale` is the loss scale the gradients carry (None without loss
    scaling). One reduction in all: clipping works on the summed gradient."""
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
        grads = reduce_gradients(grads, bucket_bytes, dtype)
    if clip_norm <= 0:
        return grads
    if scale is not None:
        grads = [g / tf.cast(scale, g.dtype) for g in grads]
    # A non-finite norm yields NaN gradients: still non-finite, so the loss-scale skip still fires.
    clipped, _ = tf.clip_by_global_norm(grads, clip_norm)
    if scale is not None:
        clipped = [g * tf.cast(scale, g.dtype) for g in clipped]
    return clipped


def make_apply_gradients(optimizer: keras.optimizers.Optimizer, variables: Sequence, clip_norm: float,
                         bucket_mb: float, dtype: str) -> Callable[[list], None]:
    """The update of one optimizer step, for inside `strategy.run`: `apply(per_replica_grads)`
    reduces once (buckets of `bucket_mb` MB in `dtype`), clips, and applies with the optimizer's
    own reduction switched off."""
    skip_gradient_aggregation(optimizer)
    bucket_bytes = int(bucket_mb * 2 ** 20)

    def apply(grads: list) -> None:
        grads = prepare_gradients(grads, clip_norm, loss_scale(optimizer), bucket_bytes, dtype)
        optimizer.apply_gradients(zip(grads, variables))

    return apply
