"""What every data source tells the rest of the program: its `Description` (TensorFlow-free).

A source is a module of `convmixer_dist/data/sources/` (cifar, synthetic, image_folder, tfrecord),
found by `--dataset` in `data/registry.py`, with these functions:

    describe(config) -> Description        classes, native image size, split sizes, mean/std, names
    check(config) -> None                  the source's own flag rules (one-line UsageError)
    load(config) -> loaded                 read and check the data once (.train_size, .eval_size,
                                           .class_names: names to save with the run, or None)
    train_examples(config, loaded, ids, pipeline, pipelines, start_step)
        -> tf.data.Dataset of (example seed, uint8 image, int32 label), endless, from `start_step`
    eval_examples(config, loaded, split, ids, pipeline, pipelines)
        -> tf.data.Dataset of (uint8 image, int32 label), every example of the split once
    reporting_errors(config, loaded) -> context manager turning a bad file met mid-run into one line

`describe`, `check` and `load`'s callers run before TensorFlow starts where they can (flags.resolve,
commands/saved_run.py), so the source modules import TensorFlow only inside their stream functions.
`data/pipeline.py` batches, augments, normalizes and distributes the streams without knowing the source.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

# Per-channel statistics in the 0..255 scale of photos (ImageNet), used for class folders and TFRecords.
IMAGENET_MEAN = (123.675, 116.28, 103.53)       # (0.485, 0.456, 0.406) * 255
IMAGENET_STD = (58.395, 57.12, 57.375)          # (0.229, 0.224, 0.225) * 255


@dataclasses.dataclass(frozen=True)
class Description:
    """The facts of one dataset under one config."""

    num_classes: int
    image_size: Optional[int]  # native resolution; None: any size (the model preset's is used)
    train_size: Optional[int]  # examples of the training split; None: known once loaded
    eval_size: Optional[int]   # examples of the test split; None: known once loaded
    mean: tuple[float, float, float]  # normalization, 0..255 scale
    std: tuple[float, float, float]
    class_names: Optional[tuple[str, ...]]  # known names; None: the data's class_names.json or class_i
    encoded: bool        # encoded images of any size: the random-resized crop is cut per example


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A source's data, read and checked once (`load`)."""

    train_size: int
    eval_size: int
    class_names: Optional[tuple[str, ...]] = None  # names to save with the run (image folders, TFRecords)
    content: Any = None  # the source's own: {"train": (images or paths, labels), "test": ...}, shards
