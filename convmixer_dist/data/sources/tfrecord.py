"""`--dataset=tfrecord --data_dir=DIR`: sharded TFRecords (the layout of TF's ImageNet tooling).

The shards are listed, counted and checked once (`data/tfrecord.py`); the records are streams, not
read by index: each input pipeline reads its own files, and an example's seed is (key of the
pipeline, its position in the pipeline's stream). No validation split (hold out shards instead).
"""
from __future__ import annotations

import json
import os

from convmixer_dist.config import Config, parse_crop_ratio
from convmixer_dist.data.source import IMAGENET_MEAN, IMAGENET_STD, Description, Loaded
from convmixer_dist.errors import UsageError
from convmixer_dist.seeds import derive_seed

CLASS_NAMES_FILE = "class_names.json"


def _class_count(data_dir: str, num_classes: int) -> int:
    """Classes of a TFRecord directory: DATA_DIR/class_names.json if the converter wrote it, else
    --num_classes (TF's ImageNet tooling writes no names: pass --num_classes=1000)."""
    path = os.path.join(data_dir or "", CLASS_NAMES_FILE)
    if not data_dir or not os.path.isfile(path):
        return num_classes
    try:
        with open(path) as f:
            names = json.load(f)
    except (OSError, ValueError):
        raise UsageError(f"{path}: not a JSON list of class names") from None
    if not isinstance(names, list):
        raise UsageError(f"{path}: not a JSON list of class names")
    return len(names)


def describe(config: Config) -> Description:
    return Description(num_classes=_class_count(config.data_dir, config.num_classes), image_size=None,
                       train_size=None, eval_size=None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       class_names=None, encoded=True)


def check(config: Config) -> None:
    if config.validation_fraction:
        raise UsageError("--validation_fraction needs random access to the training examples; "
                         "--dataset=tfrecord reads them as streams (hold out shards instead)")
    if not config.data_dir:
        raise UsageError("--dataset=tfrecord needs --data_dir=DIR with train-* and validation-* shards")


def load(config: Config) -> Loaded:
    from convmixer_dist.data import tfrecord

    shards = tfrecord.load(config.data_dir, config.tfrecord_label_offset, config.num_classes)
    names = tfrecord.read_class_names(config.data_dir)
    return Loaded(shards.train_size, shards.eval_size, None if names is None else tuple(names), shards)


def train_examples(config: Config, loaded: Loaded, ids, pipeline: int, pipelines: int, start_step: int):
    """This pipeline's (example seed, image, label) stream of its own files from `start_step`
    (positions counted per pipeline)."""
    import tensorflow as tf

    from convmixer_dist.data import image_decode, tfrecord

    shards = loaded.content
    local = config.global_batch_size // pipelines
    key = tf.constant(derive_seed(config.seed, "example augmentation", pipeline), tf.int64)
    scale, ratio = (config.crop_scale, 1.0), parse_crop_ratio(config.crop_ratio)

    def load_record(position, serialized):
        data, label = tfrecord.parse(serialized, config.tfrecord_label_offset, config.num_classes)
        seed = tf.stack([key, position])
        if config.augment == "rrc":  # the random-resized crop, cut from the decoded original
            image = image_decode.decode_random_crop(data, seed, config.image_size, scale, ratio,
                                                    config.decode_crop)
        else:
            image = image_decode.center_crop(image_decode.decode_full(data), config.image_size)
        return seed, image, label

    ds = tfrecord.train_records(shards.train_files, shards.train_counts, pipeline, pipelines,
                                derive_seed(config.seed, "record order"), start_step * local)
    return ds.map(load_record, num_parallel_calls=tf.data.AUTOTUNE)


def eval_examples(config: Config, loaded: Loaded, split: str, ids, pipeline: int, pipelines: int):
    import tensorflow as tf

    from convmixer_dist.data import image_decode, tfrecord

    shards = loaded.content

    def load_record(serialized):
        data, label = tfrecord.parse(serialized, config.tfrecord_label_offset, config.num_classes)
        return image_decode.center_crop(image_decode.decode_full(data), config.image_size,
                                        config.eval_crop_fraction), label

    return tfrecord.eval_records(shards.eval_files, shards.eval_counts, pipeline,
                                 pipelines).map(load_record, num_parallel_calls=tf.data.AUTOTUNE)


def reporting_errors(config: Config, loaded: Loaded):
    from convmixer_dist.data import tfrecord

    return tfrecord.reporting_record_errors(config.data_dir, loaded.content, config.tfrecord_label_offset,
                                            config.num_classes)
