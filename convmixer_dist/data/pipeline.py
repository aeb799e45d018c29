"""The distributed input pipelines, built with `strategy.distribute_datasets_from_function`,
the same for every data source (`data/registry.py` finds the source of --dataset).

Each input pipeline (one per worker) reads a distinct shard; batches are per-replica
(global / replicas). Training reads the source's endless stream from a given step (exact on
resume), augments per image (random crop with padding and horizontal flip, keyed by the example's
seed; the random-resized crop of encoded images is cut by the source while decoding), batches,
applies the heavy batch augmentations in tf.data (or leaves them to the train step on the device),
and normalizes with the source's mean and std. Evaluation is never augmented and covers every
example exactly once (the last, partial batch is kept).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

from convmixer_dist.config import Config, Derived, parse_crop_ratio
from convmixer_dist.data import registry
from convmixer_dist.data.augment import BatchAugmenter, normalize
from convmixer_dist.data.augment_spec import AugmentSpec
from convmixer_dist.data.source import Loaded
from convmixer_dist.seeds import derive_seed

AUTOTUNE = tf.data.AUTOTUNE


def load(config: Config) -> Loaded:
    """The source's data, read and checked (one-line UsageError on bad input)."""
    return registry.source(config).load(config)


def normalization(config: Config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) in 0..255 the input pipeline normalizes with."""
    description = registry.describe(config)
    return description.mean, description.std


def split_sizes(config: Config, loaded: Loaded | None = None) -> tuple[int, int]:
    """(training, test) examples: of the loaded data, or the dataset's known sizes."""
    if loaded is None:
        description = registry.describe(config)
        if description.train_size is not None:
            return description.train_size, description.eval_size
        loaded = load(config)
    return loaded.train_size, loaded.eval_size


def trained_sizes(config: Config, loaded: Loaded | None = None) -> tuple[int, int]:
    """(examples trained on: the training split minus the --validation_fraction hold-out,
    test examples): what `derive` must count, so steps per epoch match the training stream."""
    full_train, eval_size = split_sizes(config, loaded)
    held_out = validation_split(config, full_train)
    return (full_train if held_out is None else len(held_out[0])), eval_size


def basic_augment(image, seed, image_size: int):
    """Random crop after zero padding (4 px at 32, scaled with size) and a random horizontal flip."""
    pad = max(1, image_size // 8)
    padded = tf.image.pad_to_bounding_box(image, pad, pad, image_size + 2 * pad, image_size + 2 * pad)
    cropped = tf.image.stateless_random_crop(padded, [image_size, image_size, 3], seed=seed)
    return tf.image.stateless_random_flip_left_right(cropped, seed=seed[::-1])


def crops_per_example(config: Config) -> bool:
    """True when the random-resized crop is cut per example from the decoded original image (image
    folders and TFRecords with --augment=rrc) instead of from the batched, same-size images."""
    return registry.describe(config).encoded and config.augment == "rrc"


def augment_spec(config: Config, pipeline: int = 0) -> AugmentSpec:
    """The heavy (batched) augmentations of the config; identity when none is set. The crop is not
    among them when it is cut per example (`crops_per_example`)."""
    batch_crop = not crops_per_example(config)
    return AugmentSpec(crop_scale=config.crop_scale if batch_crop else 1.0,
                       crop_ratio=parse_crop_ratio(config.crop_ratio) if batch_crop else (1.0, 1.0),
                       randaug_n=config.randaug_n, randaug_m=config.randaug_m,
                       randaug_mstd=config.randaug_mstd, erase_mode=config.erase_mode,
                       jitter=config.jitter, erase_prob=config.erase_prob,
                       mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha,
                       hflip=config.augment == "rrc",
                       seed=derive_seed(config.seed, "batch augmentation", pipeline))


def make_augmenter(config: Config, pipeline: int = 0) -> BatchAugmenter | None:
    """A BatchAugmenter for the heavy augmentations, or None when there are none."""
    spec = augment_spec(config, pipeline)
    if spec.is_identity:
        return None
    mean, std = normalization(config)
    return BatchAugmenter(spec, config.num_classes, config.image_size, fill_mean=mean, fill_std=std)


def validation_split(config: Config, train_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(train ids, validation ids) of the training split for --validation_fraction (seeded), or None."""
    if not config.validation_fraction:
        return None
    order = np.random.default_rng(derive_seed(config.seed, "validation split")).permutation(train_size)
    held_out = max(1, int(round(train_size * config.validation_fraction)))
    return np.sort(order[held_out:]), np.sort(order[:held_out])


def _split_ids(config: Config, derived: Derived, split: str, loaded: Loaded, ids: np.ndarray | None
               ) -> np.ndarray | None:
    """The example ids a split reads (None: all of it). The validation hold-out is a pure function of
    the config, so a caller cannot forget it and train on the validation examples."""
    if split != "test" and ids is None:
        held_out = validation_split(config, loaded.train_size)
        ids = None if held_out is None else held_out[0 if split == "train" else 1]
    if split == "validation" and ids is None:
        raise ValueError("the validation split needs --validation_fraction > 0")
    if split == "train" and ids is not None and len(ids) != derived.train_size:
        raise ValueError(f"derived.train_size={derived.train_size} but {len(ids)} training ids: "
                         "derive() must count the training ids only")
    return ids


def _train_examples(config: Config, loaded: Loaded, ids, pipeline: int, pipelines: int,
                    start_step: int) -> tf.data.Dataset:
    """This pipeline's unbatched (uint8 image, label) training stream from `start_step`."""
    ds = registry.source(config).train_examples(config, loaded, ids, pipeline, pipelines, start_step)
    if config.augment == "basic":
        return ds.map(lambda seed, image, label: (basic_augment(image, seed, config.image_size), label),
                      num_parallel_calls=AUTOTUNE)
    return ds.map(lambda seed, image, label: (image, label))


# The words for the splits, everywhere: train, validation (held out of train, for model selection)
# and test (never used for selection; the image folder's val/ and the TFRecords' validation-* hold
# it). "eval" and "val" are older names of test and validation, still accepted.
SPLITS = ("train", "validation", "test")
_OLD_SPLIT_NAMES = {"eval": "test", "val": "validation"}


def split_name(split: str) -> str:
    """The current name of a split ("eval" -> "test", "val" -> "validation")."""
    split = _OLD_SPLIT_NAMES.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    return split


def make_dataset_fn(config: Config, derived: Derived, split: str, loaded: Loaded | None = None,
                    start_step: int = 0, ids: np.ndarray | None = None) -> Callable:
    """The per-input-pipeline dataset builder for `strategy.distribute_datasets_from_function`.

    `split` is "train", "test" or "validation" (held-out training examples `ids`; for "train", `ids`
    restricts training to those examples); "eval" and "val", the older names of "test" and
    "validation", still work. Training data starts at global step `start_step` (resume) and is
    identical, batch for batch, to what an uninterrupted run reads there.
    """
    split = split_name(split)
    mean, std = normalization(config)
    batch = derived.per_replica_batch_size
    loaded = load(config) if loaded is None else loaded
    ids = _split_ids(config, derived, split, loaded, ids)
    source = registry.source(config)

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        pipeline, pipelines = ctx.input_pipeline_id, ctx.num_input_pipelines
        if split == "train":
            ds = _train_examples(config, loaded, ids, pipeline, pipelines, start_step)
            # The stream is endless (every epoch a new permutation); saying so lets a multi-worker
            # iterator skip its per-step "does any worker still have data?" all-reduce.
            ds = ds.batch(batch, drop_remainder=True).apply(
                tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
            augmenter = make_augmenter(config, pipeline)
            if augmenter is not None and config.augment_on_device:
                # Raw uint8 batches; the train step augments and normalizes on the device.
                return ds.prefetch(AUTOTUNE)
            if augmenter is not None:
                # Batch k of this pipeline is micro-batch k // replicas; its augmentation seed is k.
                first = start_step * config.grad_accum_steps * (ctx.num_replicas_in_sync // pipelines)
                ds = augmenter.map_dataset(ds, start_step=first)
        else:
            # Keep the partial batch: every example is evaluated exactly once.
            ds = source.eval_examples(config, loaded, split, ids, pipeline, pipelines).batch(batch)
        ds = ds.map(lambda x, y: (normalize(x, mean, std), y), num_parallel_calls=AUTOTUNE)
        return ds.prefetch(AUTOTUNE)

    return dataset_fn


def train_dataset(strategy: tf.distribute.Strategy, config: Config, derived: Derived,
                  loaded: Loaded | None = None, start_step: int = 0, ids: np.ndarray | None = None):
    """The distributed training dataset, starting at global step `start_step`."""
    return strategy.distribute_datasets_from_function(
        make_dataset_fn(config, derived, "train", loaded, start_step, ids), _INPUT_OPTIONS)


def eval_dataset(strategy: tf.distribute.Strategy, config: Config, derived: Derived,
                 loaded: Loaded | None = None, split: str = "test", ids: np.ndarray | None = None):
    """A distributed evaluation dataset (every example once, no augmentation): the test split, or
    with split="validation" the held-out training examples `ids`."""
    return strategy.distribute_datasets_from_function(
        make_dataset_fn(config, derived, split, loaded, ids=ids), _INPUT_OPTIONS)


_INPUT_OPTIONS = tf.distribute.InputOptions(experimental_fetch_to_device=True)
