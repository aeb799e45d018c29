"""`--dataset=image_folder --data_dir=DIR`: class-per-subfolder image files (DIR/train, DIR/val).

The files are listed and checked once (`data/image_folder.py`); examples are read by index and
decoded in the pipeline: the random-resized training crop from the original (--augment=rrc), else
the evaluation transform (shorter side to image_size / --eval_crop_fraction, centre crop; at
training time with fraction 1).
"""
from __future__ import annotations

import os

import numpy as np

from convmixer_dist.config import Config, parse_crop_ratio
from convmixer_dist.data.source import IMAGENET_MEAN, IMAGENET_STD, Description, Loaded
from convmixer_dist.errors import UsageError


def _count_class_folders(data_dir: str) -> int:
    """Classes of an image_folder tree: the subfolders of DATA_DIR/train (read before TensorFlow)."""
    train = os.path.join(data_dir, "train")
    if not data_dir or not os.path.isdir(train):
        raise UsageError(f"--data_dir={data_dir!r}: --dataset=image_folder expects DIR/train/<class>/*.jpg "
                         "and DIR/val/<class>/*.jpg")
    return len([d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d))])


def describe(config: Config) -> Description:
    return Description(num_classes=_count_class_folders(config.data_dir), image_size=None,
                       train_size=None, eval_size=None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       class_names=None, encoded=True)


def check(config: Config) -> None:
    if not config.data_dir:
        raise UsageError("--dataset=image_folder needs --data_dir=DIR with DIR/train/<class>/ and DIR/val/<class>/")


def load(config: Config) -> Loaded:
    from convmixer_dist.data import image_folder

    splits, class_names = image_folder.list_image_folder_splits(config.data_dir)
    content = {"train": tuple(np.asarray(v) for v in splits["train"]),
               "test": tuple(np.asarray(v) for v in splits["val"])}
    return Loaded(len(content["train"][1]), len(content["test"][1]), tuple(class_names), content)


def train_examples(config: Config, loaded: Loaded, ids, pipeline: int, pipelines: int, start_step: int):
    import tensorflow as tf

    from convmixer_dist.data import image_folder
    from convmixer_dist.data.sources import indexed

    paths, labels = (tf.constant(v) for v in loaded.content["train"])
    labels = tf.cast(labels, tf.int32)
    if config.augment == "rrc":  # the random-resized crop, cut from the decoded original
        scale, ratio = (config.crop_scale, 1.0), parse_crop_ratio(config.crop_ratio)

        def load_example(seed, index):
            return (image_folder.decode_train_crop(tf.gather(paths, index), seed, config.image_size,
                                                   scale, ratio, config.decode_crop),
                    tf.gather(labels, index))
    else:
        def load_example(seed, index):
            return (image_folder.decode_and_resize(tf.gather(paths, index), config.image_size, 1.0),
                    tf.gather(labels, index))

    size = loaded.train_size if ids is None else len(ids)
    return indexed.train_stream(config, size, ids, pipeline, pipelines, start_step, load_example)


def eval_examples(config: Config, loaded: Loaded, split: str, ids, pipeline: int, pipelines: int):
    import tensorflow as tf

    from convmixer_dist.data import image_folder
    from convmixer_dist.data.sources import indexed

    paths, labels = (tf.constant(v) for v in loaded.content["test" if split == "test" else "train"])
    labels = tf.cast(labels, tf.int32)
    size = int(labels.shape[0]) if ids is None else len(ids)
    return indexed.eval_stream(size, ids, pipeline, pipelines, lambda i: (
        image_folder.decode_and_resize(tf.gather(paths, i), config.image_size, config.eval_crop_fraction),
        tf.gather(labels, i)))


def reporting_errors(config: Config, loaded: Loaded):
    """A corrupt image surfaces as a decode error mid-run; name the file in one line."""
    from convmixer_dist.data import image_folder

    return image_folder.reporting_corrupt_files(list(loaded.content["train"][0]) +
                                                list(loaded.content["test"][0]))
