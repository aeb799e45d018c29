"""Input pipelines: the CIFAR python-format reader, learnable synthetic data, and the distributed
tf.data pipelines built with `strategy.distribute_datasets_from_function`.

Each input pipeline (one per worker) reads a distinct shard; batches are per-replica
(global / replicas). Training visits its shard in a fresh full permutation every epoch and augments
per image (random crop with padding and horizontal flip) with stateless ops keyed by the run seed and
the example's stream position, so a run is reproducible and resumable at any step. Evaluation is
never augmented and covers every example exactly once (the last, partial batch is kept).
"""
from __future__ import annotations

import functools
import glob
import os
import pickle
import tarfile
from typing import Callable

import numpy as np
import tensorflow as tf

from convmixer_dist.data import image_decode, image_folder, tfrecord
from convmixer_dist.data.augment import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD,
                                    IMAGENET_MEAN, IMAGENET_STD, AugmentSpec, BatchAugmenter, normalize)
from convmixer_dist.config import Config, Derived, dataset_sizes, parse_crop_ratio
from convmixer_dist.errors import UsageError

AUTOTUNE = tf.data.AUTOTUNE

SYNTHETIC_MEAN = (127.5, 127.5, 127.5)
SYNTHETIC_STD = (64.0, 64.0, 64.0)
# Per-channel statistics in the 0..255 scale.
NORMALIZATION = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
                 "synthetic": (SYNTHETIC_MEAN, SYNTHETIC_STD),
                 "image_folder": (IMAGENET_MEAN, IMAGENET_STD), "tfrecord": (IMAGENET_MEAN, IMAGENET_STD)}
# Datasets of encoded images of any size: the training crop is cut from each decoded original.
ENCODED_DATASETS = ("image_folder", "tfrecord")

_CIFAR_LAYOUT = {
    # dataset: (folder inside data_dir / archive, train file glob, test file name, label key)
    "cifar10": ("cifar-10-batches-py", "data_batch_*", "test_batch", b"labels"),
    "cifar100": ("cifar-100-python", "train", "test", b"fine_labels"),
}
_ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}


# --------------------------------------------------------------------------- CIFAR python format
def _decode_batch(blob: dict, label_key: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """One unpickled CIFAR file -> (N,32,32,3) uint8 images and (N,) int32 labels."""
    try:
        data = np.asarray(blob[b"data"], dtype=np.uint8)
        labels = np.asarray(blob[label_key], dtype=np.int32)
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    except (KeyError, ValueError, TypeError) as err:
        raise UsageError(f"{source} is not a CIFAR python-format batch ({err.__class__.__name__})") from None
    if len(images) != len(labels):
        raise UsageError(f"{source} is corrupt: {len(images)} images but {len(labels)} labels")
    return images, labels


def _check_labels(labels: np.ndarray, dataset: str, source: str) -> None:
    """Labels outside 0..classes-1 (e.g. CIFAR-100 files under --dataset=cifar10) would train at
    accuracy 0 and crash at evaluation; refuse them before anything is written."""
    classes = 10 if dataset == "cifar10" else 100
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise UsageError(f"{source}: labels {int(labels.min())}..{int(labels.max())} are outside "
                         f"0..{classes - 1} of --dataset={dataset}; is it the right dataset?")


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode` as Python 3 pickles bytes at protocol <= 2 (always latin1); no other codec."""
    if encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r}")
    return text.encode("latin1")


@functools.cache
def _pickle_globals() -> dict[tuple[str, str], object]:
    """The only callables a CIFAR file may name: numpy's array reconstruction under the module
    names of numpy 1.x (`numpy.core`) and 2.x (`numpy._core`), and latin1 bytes (Python 3 writers)."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): _latin1_encode}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a callable that CIFAR files never contain."""


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that admits only what genuine CIFAR-10/100 files contain: dicts, lists, bytes,
    str, numbers and numpy arrays. Anything else (a pickle can name any importable callable, e.g.
    `os.system`) is refused before it is looked up, so loading a file never runs code from it."""

    def find_class(self, module: str, name: str):
        target = _pickle_globals().get((module, name))
        if target is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return target


def _unpickle(fileobj, source: str) -> dict:
    # The only pickle loading in the project: the official CIFAR distribution format, restricted.
    try:
        return _CifarUnpickler(fileobj, encoding="bytes").load()
    except _RefusedGlobal as err:
        raise UsageError(f"{source} is not a CIFAR python-format file: it asks to call {err}, which "
                         "CIFAR files never contain; refused without running it") from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a corrupt/foreign file
        raise UsageError(f"{source} is not a readable CIFAR python-format file "
                         f"({err.__class__.__name__})") from None


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _read_folder(folder: str, dataset: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    _, train_glob, test_name, label_key = _CIFAR_LAYOUT[dataset]
    train_files = sorted(glob.glob(os.path.join(folder, train_glob)))
    test_file = os.path.join(folder, test_name)
    if not train_files or not os.path.isfile(test_file):
        raise UsageError(f"--data_dir: {folder} lacks the {dataset} files ({train_glob} and {test_name})")
    splits = {}
    for split, files in (("train", train_files), ("test", [test_file])):
        parts = []
        for path in files:
            with open(path, "rb") as f:
                parts.append(_decode_batch(_unpickle(f, path), label_key, path))
            _check_labels(parts[-1][1], dataset, path)
        splits[split] = _concat(parts)
    return splits


def _read_archive(path: str, dataset: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder, train_glob, test_name, label_key = _CIFAR_LAYOUT[dataset]
    train_parts, test_parts = [], []
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
            for member in members:
                parent, name = os.path.split(member.name)
                if os.path.basename(parent) != folder:
                    continue
                if glob.fnmatch.fnmatch(name, train_glob):
                    target = train_parts
                elif name == test_name:
                    target = test_parts
                else:
                    continue
                source = f"{path}:{member.name}"
                target.append(_decode_batch(_unpickle(tar.extractfile(member), source), label_key, source))
                _check_labels(target[-1][1], dataset, source)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UsageError(f"--data_dir: {path} is not a readable .tar.gz ({err})") from None
    if not train_parts or not test_parts:
        raise UsageError(f"--data_dir: {path} lacks {folder}/{train_glob} or {folder}/{test_name}")
    return {"train": _concat(train_parts), "test": _concat(test_parts)}


def read_cifar(data_dir: str, dataset: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read CIFAR-10/100 in the official python format.

    `data_dir` may be the extracted folder (`cifar-10-batches-py`), its parent, the `.tar.gz` itself,
    or a folder holding the `.tar.gz`. Per-file sample counts are not assumed.
    Returns {"train": (images, labels), "test": (images, labels)} with uint8 NHWC images.
    """
    folder_name = _CIFAR_LAYOUT[dataset][0]
    if os.path.isfile(data_dir):
        return _read_archive(data_dir, dataset)
    for candidate in (data_dir, os.path.join(data_dir, folder_name)):
        if os.path.isfile(os.path.join(candidate, _CIFAR_LAYOUT[dataset][2])):
            return _read_folder(candidate, dataset)
    archive = os.path.join(data_dir, _ARCHIVES[dataset])
    if os.path.isfile(archive):
        return _read_archive(archive, dataset)
    raise UsageError(f"--data_dir={data_dir} holds neither {folder_name}/ nor {_ARCHIVES[dataset]} "
                     f"for --dataset={dataset}")


def load_arrays(config: Config) -> dict:
    """{"train": (images or paths, labels), "test": (...)}: CIFAR arrays from `--data_dir` or
    keras.datasets (download + cache); for image_folder the file lists (+ "class_names")."""
    if config.dataset == "tfrecord":
        return {"tfrecord": tfrecord.load(config.data_dir, config.tfrecord_label_offset, config.num_classes),
                "class_names": tfrecord.read_class_names(config.data_dir)}
    if config.dataset == "image_folder":
        splits, class_names = image_folder.list_image_folder_splits(config.data_dir)
        return {"train": tuple(np.asarray(v) for v in splits["train"]),
                "test": tuple(np.asarray(v) for v in splits["val"]), "class_names": class_names}
    if config.data_dir:
        return read_cifar(config.data_dir, config.dataset)
    import keras  # Imported here: only this path needs the downloader.

    loader = {"cifar10": keras.datasets.cifar10, "cifar100": keras.datasets.cifar100}[config.dataset]
    try:
        (x_train, y_train), (x_test, y_test) = loader.load_data()
    except Exception as err:  # noqa: BLE001 - any download/cache failure has the same remedy
        raise UsageError(f"could not download {config.dataset} ({err.__class__.__name__}); pass "
                         f"--data_dir with the python-format files, or use --dataset=synthetic") from None
    return {"train": (x_train, y_train.reshape(-1).astype(np.int32)),
            "test": (x_test, y_test.reshape(-1).astype(np.int32))}


def split_sizes(config: Config, arrays: dict | None) -> tuple[int, int]:
    """(training, evaluation) examples: of the loaded `arrays`, or the dataset's known sizes (synthetic)."""
    if arrays is None:
        return dataset_sizes(config)
    if "tfrecord" in arrays:
        return arrays["tfrecord"].train_size, arrays["tfrecord"].eval_size
    return len(arrays["train"][0]), len(arrays["test"][0])


def trained_sizes(config: Config, arrays: dict | None) -> tuple[int, int]:
    """(examples trained on: the training split minus the --validation_fraction hold-out,
    evaluation examples): what `derive` must count, so steps per epoch match the training stream."""
    full_train, eval_size = split_sizes(config, arrays)
    held_out = validation_split(config, full_train)
    return (full_train if held_out is None else len(held_out[0])), eval_size


# --------------------------------------------------------------------------- synthetic data
def synthetic_example(index, seed: int, image_size: int, num_classes: int):
    """A learnable example: a smooth class-specific pattern plus noise, as uint8 (in-graph).

    The class templates depend only on `seed`; `index` picks the label and the noise.
    """
    index = tf.cast(index, tf.int32)
    coarse = tf.random.stateless_uniform([num_classes, 4, 4, 3], seed=[seed, 7919], minval=-1.0, maxval=1.0)
    templates = tf.image.resize(coarse, [image_size, image_size], method="bilinear")
    label = tf.random.stateless_uniform([], seed=[seed, index], maxval=num_classes, dtype=tf.int32)
    noise = tf.random.stateless_normal([image_size, image_size, 3], seed=[seed + 1, index])
    image = 127.5 + 50.0 * tf.gather(templates, label) + 90.0 * noise
    return tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.uint8), label


# --------------------------------------------------------------------------- pipelines
def basic_augment(image, seed, image_size: int):
    """Random crop after zero padding (4 px at 32, scaled with size) and a random horizontal flip."""
    pad = max(1, image_size // 8)
    padded = tf.image.pad_to_bounding_box(image, pad, pad, image_size + 2 * pad, image_size + 2 * pad)
    cropped = tf.image.stateless_random_crop(padded, [image_size, image_size, 3], seed=seed)
    return tf.image.stateless_random_flip_left_right(cropped, seed=seed[::-1])


def _example_fn(config: Config, split: str, arrays) -> Callable:
    """index -> (uint8 image at config.image_size, int32 label), in-graph (random access by index).
    The validation split indexes the training examples (it is held out of them)."""
    if config.dataset == "synthetic":
        # Test indices are offset so they never coincide with training examples.
        offset = 1 << 30 if split == "test" else 0
        return lambda i: synthetic_example(i + offset, config.seed, config.image_size, config.num_classes)
    images, labels = arrays["test" if split == "test" else "train"]
    images, labels = tf.constant(images), tf.constant(labels, tf.int32)
    if config.dataset == "image_folder":  # `images` are file paths, decoded in the pipeline.
        fraction = config.eval_crop_fraction if split != "train" else 1.0
        return lambda i: (image_folder.decode_and_resize(tf.gather(images, i), config.image_size, fraction),
                          tf.gather(labels, i))
    resize = images.shape[1] != config.image_size

    def example(i):
        image = tf.gather(images, i)
        if resize:
            image = tf.cast(tf.image.resize(image, [config.image_size] * 2), tf.uint8)
        return image, tf.gather(labels, i)

    return example


def _train_indices(size: int, seed: int, start: int) -> tf.data.Dataset:
    """Endless stream of (position, example index) over the whole training set, each epoch a full
    permutation.

    Epoch e's order is a pure function of (seed, e), so resuming at stream position `start`
    reproduces exactly what an uninterrupted run reads next, without saving iterator state.
    """
    first_epoch, offset = divmod(start, size)

    def epoch(e):
        order = tf.argsort(tf.random.stateless_uniform([size], seed=tf.stack([seed, e])))
        return tf.data.Dataset.zip((tf.data.Dataset.range(e * size, (e + 1) * size),
                                    tf.data.Dataset.from_tensor_slices(tf.cast(order, tf.int64))))

    return tf.data.Dataset.range(first_epoch, 2 ** 62).flat_map(epoch).skip(offset)


def crops_per_example(config: Config) -> bool:
    """True when the random-resized crop is cut per example from the decoded original image (image
    folders and TFRecords with --augment=rrc) instead of from the batched, same-size images."""
    return config.dataset in ENCODED_DATASETS and config.augment == "rrc"


def train_crop_fn(config: Config) -> Callable:
    """(encoded bytes or file path, seed) -> the random-resized training crop, uint8."""
    scale, ratio = (config.crop_scale, 1.0), parse_crop_ratio(config.crop_ratio)
    if config.dataset == "image_folder":
        return lambda path, seed: image_folder.decode_train_crop(path, seed, config.image_size, scale,
                                                                 ratio, config.decode_crop)
    return lambda data, seed: image_decode.decode_random_crop(data, seed, config.image_size, scale,
                                                              ratio, config.decode_crop)


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
                       hflip=config.augment == "rrc", seed=(config.seed * 31 + pipeline) % 2 ** 31)


def make_augmenter(config: Config, pipeline: int = 0) -> BatchAugmenter | None:
    """A BatchAugmenter for the heavy augmentations, or None when there are none."""
    spec = augment_spec(config, pipeline)
    if spec.is_identity:
        return None
    mean, std = NORMALIZATION[config.dataset]
    return BatchAugmenter(spec, config.num_classes, config.image_size, fill_mean=mean, fill_std=std)


def validation_split(config: Config, train_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(train ids, validation ids) of the training split for --validation_fraction (seeded), or None."""
    if not config.validation_fraction:
        return None
    order = np.random.default_rng(config.seed + 12345).permutation(train_size)
    held_out = max(1, int(round(train_size * config.validation_fraction)))
    return np.sort(order[held_out:]), np.sort(order[:held_out])


def _split_ids(config: Config, derived: Derived, split: str, arrays, ids: np.ndarray | None
               ) -> np.ndarray | None:
    """The example ids a split reads (None: all of it). The validation hold-out is a pure function of
    the config, so a caller cannot forget it and train on the validation examples."""
    if split != "test" and ids is None:
        held_out = validation_split(config, split_sizes(config, arrays)[0])
        ids = None if held_out is None else held_out[0 if split == "train" else 1]
    if split == "validation" and ids is None:
        raise ValueError("the validation split needs --validation_fraction > 0")
    if split == "train" and ids is not None and len(ids) != derived.train_size:
        raise ValueError(f"derived.train_size={derived.train_size} but {len(ids)} training ids: "
                         "derive() must count the training ids only")
    return ids


def _tfrecord_train_examples(config: Config, arrays, pipeline: int, pipelines: int,
                             start_step: int) -> tf.data.Dataset:
    """This pipeline's unbatched (uint8 image, label) stream of its own TFRecord files from
    `start_step` (positions counted per pipeline)."""
    local = config.global_batch_size // pipelines
    records = arrays["tfrecord"]
    crop = train_crop_fn(config) if crops_per_example(config) else None
    seed = tf.constant(config.seed * 7919, tf.int64) * 1009 + pipeline

    def load_record(position, serialized):
        data, label = tfrecord.parse(serialized, config.tfrecord_label_offset, config.num_classes)
        if crop is not None:
            return crop(data, tf.stack([seed, position])), label
        image = image_decode.center_crop(image_decode.decode_full(data), config.image_size)
        if config.augment == "basic":
            image = basic_augment(image, tf.stack([seed, position]), config.image_size)
        return image, label

    ds = tfrecord.train_records(records.train_files, records.train_counts, pipeline, pipelines,
                                config.seed * 997, start_step * local)
    return ds.map(load_record, num_parallel_calls=AUTOTUNE)


def _train_examples(config: Config, derived: Derived, arrays, example: Callable | None,
                    id_table, pipeline: int, pipelines: int, start_step: int) -> tf.data.Dataset:
    """This pipeline's unbatched (uint8 image, label) training stream from `start_step`."""
    if config.dataset == "tfrecord":
        return _tfrecord_train_examples(config, arrays, pipeline, pipelines, start_step)
    # Each global step consumes global_batch_size examples (all micro-batches of the step).
    local = config.global_batch_size // pipelines
    aug_seed = tf.constant(config.seed * 7919, tf.int64)
    # One global stream for every topology: each global step takes the next global batch, and this
    # pipeline reads (only) the slice that belongs to its replicas. So 2 workers x 1 replica see
    # exactly the batches of 1 worker x 2 replicas, or of one device.
    first = pipeline * local
    ds = _train_indices(derived.train_size, config.seed * 997, start_step * config.global_batch_size)
    ds = ds.batch(config.global_batch_size, drop_remainder=True)
    ds = ds.map(lambda pos, idx: (pos[first:first + local], idx[first:first + local])).unbatch()
    crop = train_crop_fn(config) if crops_per_example(config) else None
    paths = (tf.constant(arrays["train"][0]) if crop is not None else None)
    labels = (tf.constant(arrays["train"][1], tf.int32) if crop is not None else None)

    def load(position, index):
        index = index if id_table is None else tf.gather(id_table, index)
        if crop is not None:
            return crop(tf.gather(paths, index), tf.stack([aug_seed, position])), tf.gather(labels, index)
        image, label = example(index)
        if config.augment == "basic":
            image = basic_augment(image, tf.stack([aug_seed, position]), config.image_size)
        return image, label

    return ds.map(load, num_parallel_calls=AUTOTUNE)


def _eval_examples(config: Config, derived: Derived, arrays, example: Callable | None, id_table,
                   pipeline: int, pipelines: int) -> tf.data.Dataset:
    """This pipeline's share of an evaluation split, every example once, unbatched."""
    if config.dataset == "tfrecord":
        records = arrays["tfrecord"]

        def load_record(serialized):
            data, label = tfrecord.parse(serialized, config.tfrecord_label_offset, config.num_classes)
            image = image_decode.center_crop(image_decode.decode_full(data), config.image_size,
                                             config.eval_crop_fraction)
            return image, label

        return tfrecord.eval_records(records.eval_files, records.eval_counts, pipeline,
                                     pipelines).map(load_record, num_parallel_calls=AUTOTUNE)
    if id_table is None:
        ds = tf.data.Dataset.range(pipeline, derived.eval_size, pipelines)
    else:
        ds = tf.data.Dataset.from_tensor_slices(id_table).shard(pipelines, pipeline)
    return ds.map(example, num_parallel_calls=AUTOTUNE)


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


def make_dataset_fn(config: Config, derived: Derived, split: str, arrays=None,
                    start_step: int = 0, ids: np.ndarray | None = None) -> Callable:
    """The per-input-pipeline dataset builder for `strategy.distribute_datasets_from_function`.

    `split` is "train", "test" or "validation" (held-out training examples `ids`; for "train", `ids`
    restricts training to those examples); "eval" and "val", the older names of "test" and
    "validation", still work. Training data starts at global step `start_step` (resume) and is
    identical, batch for batch, to what an uninterrupted run reads there.
    """
    split = split_name(split)
    mean, std = NORMALIZATION[config.dataset]
    batch = derived.per_replica_batch_size
    example = None if config.dataset == "tfrecord" else _example_fn(config, split, arrays)
    ids = _split_ids(config, derived, split, arrays, ids)
    id_table = None if ids is None else tf.constant(ids, tf.int64)

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        pipeline, pipelines = ctx.input_pipeline_id, ctx.num_input_pipelines
        if split == "train":
            ds = _train_examples(config, derived, arrays, example, id_table, pipeline, pipelines,
                                 start_step)
            ds = ds.batch(batch, drop_remainder=True)
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
            ds = _eval_examples(config, derived, arrays, example, id_table, pipeline,
                                pipelines).batch(batch)
        ds = ds.map(lambda x, y: (normalize(x, mean, std), y), num_parallel_calls=AUTOTUNE)
        return ds.prefetch(AUTOTUNE)

    return dataset_fn


def train_dataset(strategy: tf.distribute.Strategy, config: Config, derived: Derived, arrays=None,
                  start_step: int = 0, ids: np.ndarray | None = None):
    """The distributed training dataset, starting at global step `start_step`."""
    return strategy.distribute_datasets_from_function(
        make_dataset_fn(config, derived, "train", arrays, start_step, ids), _INPUT_OPTIONS)


def eval_dataset(strategy: tf.distribute.Strategy, config: Config, derived: Derived, arrays=None,
                 split: str = "test", ids: np.ndarray | None = None):
    """A distributed evaluation dataset (every example once, no augmentation): the test split, or
    with split="validation" the held-out training examples `ids`."""
    return strategy.distribute_datasets_from_function(
        make_dataset_fn(config, derived, split, arrays, ids=ids), _INPUT_OPTIONS)


_INPUT_OPTIONS = tf.distribute.InputOptions(experimental_fetch_to_device=True)
