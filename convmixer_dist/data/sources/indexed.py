"""The streams of sources whose examples are read by index (CIFAR arrays, image files, synthetic).

Training reads one global stream for every topology: each epoch is a full permutation of the
training examples, a pure function of (seed, epoch), and each global step takes the next global
batch, of which an input pipeline reads only its own slice. So 2 workers x 1 replica see exactly the
batches of 1 worker x 2 replicas, or of one device, and resuming at stream position p reproduces
what an uninterrupted run reads there without saving iterator state. Each example's seed is
(key, its stream position). Evaluation reads every example once, sharded over the pipelines.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

from convmixer_dist.config import Config
from convmixer_dist.seeds import derive_seed

AUTOTUNE = tf.data.AUTOTUNE


def _positions(size: int, key: int, start: int) -> tf.data.Dataset:
    """Endless stream of (position, example index), each epoch a full permutation, from `start`."""
    first_epoch, offset = divmod(start, size)

    def epoch(e):
        order = tf.argsort(tf.random.stateless_uniform([size], seed=tf.stack([tf.constant(key, tf.int64), e])))
        return tf.data.Dataset.zip((tf.data.Dataset.range(e * size, (e + 1) * size),
                                    tf.data.Dataset.from_tensor_slices(tf.cast(order, tf.int64))))

    return tf.data.Dataset.range(first_epoch, 2 ** 62).flat_map(epoch).skip(offset)


def train_stream(config: Config, size: int, ids: np.ndarray | None, pipeline: int, pipelines: int,
                 start_step: int, load: Callable) -> tf.data.Dataset:
    """This pipeline's (example seed, image, label) stream from global step `start_step`;
    `load(seed, index)` -> (image, label) reads example `index` (of `ids` when given)."""
    # Each global step consumes global_batch_size examples (all micro-batches of the step).
    local = config.global_batch_size // pipelines
    first = pipeline * local
    ds = _positions(size, derive_seed(config.seed, "example order"), start_step * config.global_batch_size)
    ds = ds.batch(config.global_batch_size, drop_remainder=True)
    ds = ds.map(lambda pos, idx: (pos[first:first + local], idx[first:first + local])).unbatch()
    key = tf.constant(derive_seed(config.seed, "example augmentation"), tf.int64)
    id_table = None if ids is None else tf.constant(ids, tf.int64)

    def example(position, index):
        index = index if id_table is None else tf.gather(id_table, index)
        seed = tf.stack([key, position])
        return (seed, *load(seed, index))

    return ds.map(example, num_parallel_calls=AUTOTUNE)


def eval_stream(size: int, ids: np.ndarray | None, pipeline: int, pipelines: int,
                example: Callable) -> tf.data.Dataset:
    """This pipeline's share of `size` examples (the ids given, else 0..size-1), each once."""
    if ids is None:
        ds = tf.data.Dataset.range(pipeline, size, pipelines)
    else:
        ds = tf.data.Dataset.from_tensor_slices(tf.constant(ids, tf.int64)).shard(pipelines, pipeline)
    return ds.map(example, num_parallel_calls=AUTOTUNE)


def array_example(images: np.ndarray, labels: np.ndarray, image_size: int) -> Callable:
    """index -> (uint8 image resized to image_size if needed, int32 label), in-graph."""
    images, labels = tf.constant(images), tf.constant(labels, tf.int32)
    resize = images.shape[1] != image_size

    def example(i):
        image = tf.gather(images, i)
        if resize:
            image = tf.cast(tf.image.resize(image, [image_size] * 2), tf.uint8)
        return image, tf.gather(labels, i)

    return example
