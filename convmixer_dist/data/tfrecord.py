"""`--dataset=tfrecord --data_dir=DIR`: sharded TFRecords in the layout of TF's ImageNet tooling.

    DIR/train-00000-of-01024 ... DIR/validation-00000-of-00128
    each record a tf.train.Example with image/encoded (JPEG/PNG bytes) and image/class/label (int64)

TF's ImageNet tooling stores labels 1..1000 (0 was "background"), so `--tfrecord_label_offset=1`
(default) is subtracted; the converter (`convmixer_dist.commands.make_tfrecords`) writes the same
convention, plus `class_names.json` (label order) and `tfrecord_info.json` (records per shard)
beside the shards. Without the info file the records are counted once at start-up (reads every
shard; minutes for ImageNet).

Training. Each input pipeline (worker) reads its own files (every pipelines-th shard, the
`AutoShardPolicy.FILE` rule); with fewer files than pipelines every pipeline reads all files and
keeps every pipelines-th record. Its epoch e is: its files in an order shuffled by (seed, e), read by
a deterministic parallel interleave, then permuted in windows of 10,000 records (stateless, by
(seed, e, window)); the converter already spreads every class over all shards. The stream is therefore a pure
function of (seed, pipeline, position): resuming at step s skips the records before position
s x (global batch / pipelines) — read, never decoded — and continues exactly where an uninterrupted
run would be. Evaluation reads the validation shards once, in order, sharded the same way.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from convmixer_dist.errors import UsageError

TRAIN_PREFIX = "train-"
EVAL_PREFIX = "validation-"
INFO_FILE = "tfrecord_info.json"
CLASS_NAMES_FILE = "class_names.json"
IMAGE_KEY = "image/encoded"
LABEL_KEY = "image/class/label"
SHUFFLE_BUFFER = 10000   # records per pipeline (TF's ImageNet pipelines use 10,000)
CYCLE_LENGTH = 16        # files read in parallel per pipeline
_FEATURES = {IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
             LABEL_KEY: tf.io.FixedLenFeature([], tf.int64)}


@dataclass(frozen=True)
class TFRecordData:
    """The shards of both splits and their record counts (index-aligned)."""

    train_files: tuple
    train_counts: tuple
    eval_files: tuple
    eval_counts: tuple

    @property
    def train_size(self) -> int:
        return int(sum(self.train_counts))

    @property
    def eval_size(self) -> int:
        return int(sum(self.eval_counts))


def list_shards(data_dir: str, prefix: str) -> list[str]:
    """Sorted `data_dir/prefix*` files (temporary `.tmp` files of an unfinished conversion excluded)."""
    if not tf.io.gfile.isdir(data_dir):
        raise UsageError(f"--data_dir={data_dir!r}: not a directory (expected {prefix}* TFRecord shards)")
    names = sorted(n for n in tf.io.gfile.listdir(data_dir)
                   if n.startswith(prefix) and not n.endswith(".tmp"))
    if not names:
        raise UsageError(f"--data_dir={data_dir}: no {prefix}* TFRecord shards (expected "
                         f"{data_dir}/{prefix}00000-of-NNNNN ...; convert an image folder with "
                         "python -m convmixer_dist.commands.make_tfrecords)")
    return [os.path.join(data_dir, n) for n in names]


def count_records(files: Sequence[str]) -> list[int]:
    """Records per file, by reading them (raises UsageError naming a corrupt file)."""
    counts = []
    for path in files:
        try:
            counts.append(int(tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda n, _: n + 1)))
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as err:
            raise UsageError(f"--data_dir: corrupt TFRecord file {path} ({_first_line(err)})") from None
    return counts


def _first_line(err: Exception) -> str:
    return str(getattr(err, "message", err)).strip().splitlines()[0][:160]


def read_info(data_dir: str) -> dict:
    """`tfrecord_info.json` ({"shards": {file name: records}}), or {} if there is none."""
    path = os.path.join(data_dir, INFO_FILE)
    if not tf.io.gfile.exists(path):
        return {}
    try:
        with tf.io.gfile.GFile(path) as f:
            info = json.load(f)
        shards = info["shards"]
        if not all(isinstance(k, str) and isinstance(v, int) for k, v in shards.items()):
            raise ValueError("bad shard counts")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise UsageError(f"{path}: expected {{\"shards\": {{file name: record count}}}} ({err})") from None
    return info


def shard_counts(data_dir: str, files: Sequence[str]) -> list[int]:
    """Records per shard: from tfrecord_info.json where listed, else counted by reading."""
    known = read_info(data_dir).get("shards", {})
    missing = [f for f in files if os.path.basename(f) not in known]
    counted = dict(zip(missing, count_records(missing))) if missing else {}
    return [known[os.path.basename(f)] if f not in counted else counted[f] for f in files]


def check_first_record(path: str, label_offset: int, num_classes: int) -> None:
    """Parse the first record of `path` now, so a wrong layout or label offset is one line, not a
    failure deep in the pipeline."""
    try:
        record = next(iter(tf.data.TFRecordDataset(path).take(1)), None)
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as err:
        raise UsageError(f"--data_dir: corrupt TFRecord file {path} ({_first_line(err)})") from None
    if record is None:
        raise UsageError(f"--data_dir: TFRecord file {path} is empty")
    try:
        example = tf.train.Example.FromString(record.numpy())
    except Exception as err:  # noqa: BLE001 - any protobuf failure means "not a tf.train.Example"
        raise UsageError(f"--data_dir: {path} does not hold tf.train.Example records "
                         f"({err.__class__.__name__})") from None
    feature = example.features.feature
    if not feature[IMAGE_KEY].bytes_list.value or not feature[LABEL_KEY].int64_list.value:
        raise UsageError(f"--data_dir: records of {path} lack {IMAGE_KEY} (bytes) and {LABEL_KEY} "
                         f"(int64); found keys {sorted(feature.keys())[:8]}")
    label = feature[LABEL_KEY].int64_list.value[0] - label_offset
    if not 0 <= label < num_classes:
        raise UsageError(f"--tfrecord_label_offset={label_offset}: the first record of {path} has "
                         f"{LABEL_KEY}={label + label_offset}, outside 0..{num_classes - 1} after the "
                         f"offset (TF's ImageNet tooling: 1; 0-based labels: 0)")


def load(data_dir: str, label_offset: int, num_classes: int) -> TFRecordData:
    """List and count both splits' shards and check the first record; UsageError on bad input."""
    train = list_shards(data_dir, TRAIN_PREFIX)
    evaluation = list_shards(data_dir, EVAL_PREFIX)
    check_first_record(train[0], label_offset, num_classes)
    return TFRecordData(tuple(train), tuple(shard_counts(data_dir, train)),
                        tuple(evaluation), tuple(shard_counts(data_dir, evaluation)))


def read_class_names(data_dir: str) -> list[str] | None:
    """DATA_DIR/class_names.json (written by the converter), or None."""
    path = os.path.join(data_dir, CLASS_NAMES_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            names = json.load(f)
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UsageError(f"{path}: expected a JSON list of class-name strings")
    return names


def parse(serialized: tf.Tensor, label_offset: int) -> tuple[tf.Tensor, tf.Tensor]:
    """One serialized example -> (encoded image bytes, int32 label - offset)."""
    features = tf.io.parse_single_example(serialized, _FEATURES)
    return features[IMAGE_KEY], tf.cast(features[LABEL_KEY] - label_offset, tf.int32)


def pipeline_files(files: Sequence[str], counts: Sequence[int], pipeline: int, pipelines: int
                   ) -> tuple[list[str], int, bool]:
    """(files this pipeline reads, its records per epoch, per-example sharding?)."""
    if len(files) >= pipelines:
        return list(files[pipeline::pipelines]), int(sum(counts[pipeline::pipelines])), False
    total = int(sum(counts))
    return list(files), len(range(pipeline, total, pipelines)), True


def train_records(files: Sequence[str], counts: Sequence[int], pipeline: int, pipelines: int,
                  seed: int, start: int, shuffle_buffer: int = SHUFFLE_BUFFER) -> tf.data.Dataset:
    """Endless (position, serialized record) stream of this pipeline from its position `start`."""
    mine, size, per_example = pipeline_files(files, counts, pipeline, pipelines)
    if size < 1:
        raise UsageError(f"--data_dir: input pipeline {pipeline} of {pipelines} gets no training records "
                         f"({sum(counts)} records in {len(files)} shards)")
    file_table = tf.constant(mine, tf.string)
    first_epoch, offset = divmod(start, size)

    def epoch(e):
        epoch_seed = tf.stack([tf.constant(seed, tf.int64), e])
        order = tf.argsort(tf.random.stateless_uniform([len(mine)], seed=epoch_seed))
        ds = tf.data.Dataset.from_tensor_slices(tf.gather(file_table, order))
        ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(len(mine), CYCLE_LENGTH),
                           block_length=1, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if per_example:
            ds = ds.shard(pipelines, pipeline)
        # Stateless window shuffle: each window of `window` records is permuted by (seed, e, window
        # index). Dataset.shuffle would draw from the op/global seed state instead.
        window = min(shuffle_buffer, size)
        windows = tf.data.Dataset.zip((tf.data.Dataset.range(2 ** 62), ds.batch(window)))
        return windows.map(lambda w, batch: tf.gather(batch, tf.argsort(tf.random.stateless_uniform(
            tf.shape(batch)[:1], seed=tf.stack([seed * 1_000_003 + e, w]))))).unbatch()

    records = tf.data.Dataset.range(first_epoch, 2 ** 62).flat_map(epoch).skip(offset)
    return tf.data.Dataset.zip((tf.data.Dataset.range(start, 2 ** 62), records))


def eval_records(files: Sequence[str], counts: Sequence[int], pipeline: int, pipelines: int
                 ) -> tf.data.Dataset:
    """This pipeline's share of the validation records, each exactly once, in file order."""
    mine, _, per_example = pipeline_files(files, counts, pipeline, pipelines)
    ds = tf.data.TFRecordDataset(mine, num_parallel_reads=min(len(mine), CYCLE_LENGTH))
    return ds.shard(pipelines, pipeline) if per_example else ds


@contextlib.contextmanager
def reporting_record_errors(data_dir: str) -> Iterator[None]:
    """Wrap the loop consuming a TFRecord dataset: a corrupt record or a foreign record layout met
    mid-run becomes a one-line UsageError instead of a TensorFlow traceback."""
    try:
        yield
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as err:
        usage = records_error(err, data_dir)
        if usage is None:
            raise
        raise usage from None


def records_error(err: Exception, data_dir: str) -> UsageError | None:
    """A TFRecord read/parse failure during training as a one-line UsageError (None if it is not one)."""
    message = _first_line(err)
    if isinstance(err, tf.errors.DataLossError):
        return UsageError(f"--data_dir={data_dir}: corrupt TFRecord data ({message})")
    if isinstance(err, tf.errors.InvalidArgumentError) and ("Feature:" in message or
                                                             "Could not parse example" in message):
        return UsageError(f"--data_dir={data_dir}: records are not {IMAGE_KEY} + {LABEL_KEY} "
                          f"tf.train.Examples ({message})")
    return None
