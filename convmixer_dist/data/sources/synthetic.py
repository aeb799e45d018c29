"""`--dataset=synthetic`: learnable generated images (a smooth pattern per class plus noise).

Example i is a pure function of (seed, i), generated in the pipeline: no files, any size. The test
split's indices are offset by 2**30, so they never coincide with training examples.
"""
from __future__ import annotations

import contextlib

from convmixer_dist.config import Config
from convmixer_dist.data.source import Description, Loaded
from convmixer_dist.errors import UsageError
from convmixer_dist.seeds import derive_seed

MEAN = (127.5, 127.5, 127.5)
STD = (64.0, 64.0, 64.0)
IMAGE_SIZE = 32
TEST_OFFSET = 1 << 30


def synthetic_example(index, seed: int, image_size: int, num_classes: int):
    """A learnable example: a smooth class-specific pattern plus noise, as uint8 (in-graph).

    The class templates depend only on `seed`; `index` picks the label and the noise.
    """
    import tensorflow as tf

    index = tf.cast(index, tf.int64)
    coarse = tf.random.stateless_uniform([num_classes, 4, 4, 3], seed=[derive_seed(seed, "synthetic classes"), 0],
                                         minval=-1.0, maxval=1.0)
    templates = tf.image.resize(coarse, [image_size, image_size], method="bilinear")
    label = tf.random.stateless_uniform([], seed=tf.stack([tf.constant(derive_seed(seed, "synthetic labels"),
                                                                       tf.int64), index]),
                                        maxval=num_classes, dtype=tf.int32)
    noise = tf.random.stateless_normal([image_size, image_size, 3],
                                       seed=tf.stack([tf.constant(derive_seed(seed, "synthetic noise"),
                                                                  tf.int64), index]))
    image = 127.5 + 50.0 * tf.gather(templates, label) + 90.0 * noise
    return tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.uint8), label


def describe(config: Config) -> Description:
    return Description(num_classes=config.num_classes, image_size=IMAGE_SIZE,
                       train_size=config.synthetic_train_size, eval_size=config.synthetic_test_size,
                       mean=MEAN, std=STD, class_names=None, encoded=False)


def check(config: Config) -> None:
    if config.data_dir:
        raise UsageError("--data_dir is not used by --dataset=synthetic; drop it or pick a real dataset")


def load(config: Config) -> Loaded:
    return Loaded(config.synthetic_train_size, config.synthetic_test_size)


def _example(config: Config, offset: int):
    return lambda i: synthetic_example(i + offset, config.seed, config.image_size, config.num_classes)


def train_examples(config: Config, loaded: Loaded, ids, pipeline: int, pipelines: int, start_step: int):
    from convmixer_dist.data.sources import indexed

    example = _example(config, 0)
    size = loaded.train_size if ids is None else len(ids)
    return indexed.train_stream(config, size, ids, pipeline, pipelines, start_step,
                                lambda seed, index: example(index))


def eval_examples(config: Config, loaded: Loaded, split: str, ids, pipeline: int, pipelines: int):
    from convmixer_dist.data.sources import indexed

    size = (loaded.eval_size if split == "test" else loaded.train_size) if ids is None else len(ids)
    return indexed.eval_stream(size, ids, pipeline, pipelines,
                               _example(config, TEST_OFFSET if split == "test" else 0))


def reporting_errors(config: Config, loaded: Loaded):
    return contextlib.nullcontext()
