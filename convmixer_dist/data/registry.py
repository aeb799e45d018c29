"""`--dataset` -> its data source module: the one place the dataset kind is looked up."""
from __future__ import annotations

from types import ModuleType

from convmixer_dist.config import Config
from convmixer_dist.data.source import Description
from convmixer_dist.data.sources import cifar, image_folder, synthetic, tfrecord

SOURCES: dict[str, ModuleType] = {"cifar10": cifar, "cifar100": cifar, "synthetic": synthetic,
                                  "image_folder": image_folder, "tfrecord": tfrecord}


def source(config: Config) -> ModuleType:
    """The source module of `config.dataset` (see `data/source.py` for its functions)."""
    return SOURCES[config.dataset]


def describe(config: Config) -> Description:
    """The dataset's facts (TensorFlow-free): classes, native size, sizes, mean/std, class names."""
    return source(config).describe(config)
