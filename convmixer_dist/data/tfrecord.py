"""`--dataset=tfrecord --data_dir=DIR`: sharded TFRecords in the layout of TF's ImageNet tooling.

    DIR/train-00000-of-01024 ... DIR/validation-00000-of-00128
    each record a tf.train.Example with image/encoded (JPEG/PNG bytes) and image/class/label (int64)

TF's ImageNet tooling stores labels 1..1000 (0 was "background"), so `--tfrecord_label_offset=1`
(default) is subtracted; the converter (`convmixer_dist.commands.make_tfrecords`) writes the same
convention, plus `class_names.json` (label order) and `tfrecord_info.json` (records per shard)
beside the shards. Without the info file the records are counted once at start-up (reads every
shard; minutes for ImageNet).

Validation before anything is written (`load`): one `-of-N` family per split with every index
0..N-1; with the converter's manifest, a finished conversion whose label offset and class count
match the flags and whose every shard is listed with its size; every shard's first record parsed
(layout, image bytes, label range); no validation shard a copy of a training shard; at least one
record per split. While training, `parse` fails on a label outside [0, classes) (never a zero
one-hot target), and `reporting_record_errors` names the shard and record of any failure.

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
import re
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
_SHARD_NAME = re.compile(r"(\d{5})-of-(\d{5})")
# Leading bytes of the image formats tf.io.decode_image reads.
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
_LABEL_ERROR = "label outside the classes:"
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


def check_shard_family(data_dir: str, files: Sequence[str], prefix: str) -> None:
    """One `PREFIX-IIIII-of-NNNNN` family per split with every index 0..N-1: stale shards of another
    --shards beside the new ones, a missing shard or a stray file are one line, not silently read."""
    families: dict[int, set[int]] = {}
    for path in files:
        match = _SHARD_NAME.fullmatch(os.path.basename(path)[len(prefix):])
        if not match:
            raise UsageError(f"--data_dir={data_dir}: {os.path.basename(path)} is not a shard name "
                             f"({prefix}IIIII-of-NNNNN); move it out of the shard directory")
        families.setdefault(int(match.group(2)), set()).add(int(match.group(1)))
    if len(families) > 1:
        found = ", ".join(f"-of-{n:05d} ({len(i)} files)" for n, i in sorted(families.items()))
        raise UsageError(f"--data_dir={data_dir}: {prefix}* shards of {len(families)} conversions mixed "
                         f"({found}); remove the stale family or convert again with --overwrite")
    (count, indices), = families.items()
    missing = sorted(set(range(count)) - indices)
    extra = sorted(i for i in indices if i >= count)
    if missing or extra:
        what = f"missing {prefix}{missing[0]:05d}-of-{count:05d}" if missing else f"index {extra[0]} >= {count}"
        raise UsageError(f"--data_dir={data_dir}: incomplete {prefix}* family ({what}; "
                         f"{len(missing)} of {count} missing); finish the conversion (rerun make_tfrecords)")


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
    lines = [line.strip() for line in str(getattr(err, "message", err)).splitlines()]
    useful = [line for line in lines if line and not line.startswith(("Graph execution error",
                                                                     "Detected at node", "File "))]
    return re.sub(r"\{\{[^}]*\}\}\s*", "", (useful or lines or [""])[0])[:160]


def read_info(data_dir: str) -> dict:
    """`tfrecord_info.json`: the converter's manifest ({"plan", "complete", "shards": {file name:
    {"records", "bytes", "sha256"}}}; older versions: {file name: records}), or {} if there is none."""
    path = os.path.join(data_dir, INFO_FILE)
    if not tf.io.gfile.exists(path):
        return {}
    try:
        with tf.io.gfile.GFile(path) as f:
            info = json.load(f)
        shards = info["shards"]
        if not all(isinstance(k, str) and _entry_records(v) is not None for k, v in shards.items()):
            raise ValueError("bad shard counts")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise UsageError(f"{path}: expected {{\"shards\": {{file name: record count}}}} ({err})") from None
    return info


def _entry_records(entry) -> int | None:
    if isinstance(entry, dict):
        entry = entry.get("records")
    return entry if isinstance(entry, int) and not isinstance(entry, bool) and entry >= 0 else None


def check_plan(data_dir: str, info: dict, label_offset: int, num_classes: int) -> None:
    """The converter's plan (when the manifest has one) against the flags: the conversion finished,
    with the label offset and class count the flags say."""
    plan = info.get("plan")
    if not isinstance(plan, dict):
        return
    where = f"--data_dir={data_dir} ({INFO_FILE})"
    if info.get("complete") is not True:
        raise UsageError(f"{where}: the conversion is unfinished ({len(info['shards'])} of "
                         f"{plan.get('shards', 0) + plan.get('eval_shards', 0)} shards); rerun the same "
                         "make_tfrecords command to finish it")
    if plan.get("label_offset") != label_offset:
        raise UsageError(f"--tfrecord_label_offset={label_offset}: the shards in {data_dir} were written "
                         f"with --label_offset={plan.get('label_offset')} ({INFO_FILE}); train with "
                         f"--tfrecord_label_offset={plan.get('label_offset')}")
    classes = len(plan.get("class_names") or [])
    if classes != num_classes:
        raise UsageError(f"--num_classes={num_classes}: the shards in {data_dir} hold {classes} classes "
                         f"({INFO_FILE})")


def check_manifest(data_dir: str, info: dict, files: Sequence[str]) -> None:
    """One split's shards against the manifest (when it has a plan): every shard listed, none
    missing, each with its listed size on disk."""
    if not isinstance(info.get("plan"), dict):
        return
    where = f"--data_dir={data_dir} ({INFO_FILE})"
    names = {os.path.basename(f) for f in files}
    prefix = os.path.basename(files[0])[:os.path.basename(files[0]).index("-") + 1]
    for name in sorted(n for n in set(info["shards"]) - names if n.startswith(prefix)):
        raise UsageError(f"{where}: lists {name}, which is missing; convert again")
    for path in files:
        entry = info["shards"].get(os.path.basename(path))
        if entry is None:
            raise UsageError(f"{where}: {os.path.basename(path)} is not a shard of this conversion; "
                             "remove it or convert again with --overwrite")
        size = tf.io.gfile.stat(path).length
        if isinstance(entry, dict) and entry.get("bytes") != size:
            raise UsageError(f"--data_dir: TFRecord file {path} has {size} bytes, the manifest says "
                             f"{entry.get('bytes')} (truncated, compressed or replaced); convert again")


def shard_counts(data_dir: str, files: Sequence[str], info: dict | None = None) -> list[int]:
    """Records per shard: from tfrecord_info.json where listed, else counted by reading."""
    known = (read_info(data_dir) if info is None else info).get("shards", {})
    missing = [f for f in files if os.path.basename(f) not in known]
    counted = dict(zip(missing, count_records(missing))) if missing else {}
    return [_entry_records(known[os.path.basename(f)]) if f not in counted else counted[f] for f in files]


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord framing uses; bitwise, for the 8 bytes of a length field."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def read_first_record(path: str) -> bytes | None:
    """The first record's bytes of a TFRecord file (None if the file is empty), read directly: its
    length and the length's checksum are checked, so a compressed or foreign file fails here."""
    with tf.io.gfile.GFile(path, "rb") as f:
        header = f.read(12)
        if not header:
            return None
        length = int.from_bytes(header[:8], "little") if len(header) == 12 else -1
        if length < 0 or _masked_crc(header[:8]) != int.from_bytes(header[8:], "little") or \
                length > tf.io.gfile.stat(path).length - 16:
            raise UsageError(f"--data_dir: corrupt TFRecord file {path} (the first record's framing is "
                             "invalid: not an uncompressed TFRecord file, e.g. gzipped or truncated)")
        return f.read(length)


def record_problem(record: bytes, label_offset: int, num_classes: int) -> str | None:
    """Why a serialized record is not an image/encoded + image/class/label example with a label in
    range, in words; None when it is one."""
    try:
        example = tf.train.Example.FromString(record)
    except Exception as err:  # noqa: BLE001 - any protobuf failure means "not a tf.train.Example"
        return f"not a tf.train.Example ({err.__class__.__name__})"
    feature = example.features.feature
    images, labels = feature[IMAGE_KEY].bytes_list.value, feature[LABEL_KEY].int64_list.value
    if len(images) != 1 or len(labels) != 1:
        return (f"its features lack {IMAGE_KEY} (bytes) or {LABEL_KEY} (int64), one value each; "
                f"found keys {sorted(feature.keys())[:8]}")
    if not images[0].startswith(_IMAGE_SIGNATURES):
        return f"{IMAGE_KEY} is not JPEG/PNG/GIF/BMP bytes"
    if not 0 <= labels[0] - label_offset < num_classes:
        return (f"{LABEL_KEY}={labels[0]}, outside 0..{num_classes - 1} after "
                f"--tfrecord_label_offset={label_offset} (TF's ImageNet tooling: 1; 0-based labels: 0)")
    return None


def check_first_records(files: Sequence[str], label_offset: int, num_classes: int
                        ) -> dict[tuple[int, bytes], str]:
    """Check every shard's first record now (layout, image bytes, label range), so a foreign shard
    anywhere in the set is one line before training; returns {(file size, first record): shard}
    (empty shards left out), which tells a copied shard apart."""
    first = {}
    for path in files:
        record = read_first_record(path)
        if record is None:
            continue
        problem = record_problem(record, label_offset, num_classes)
        if problem:
            raise UsageError(f"--data_dir: record 0 of {path}: {problem}")
        first[(tf.io.gfile.stat(path).length, record)] = path
    return first


def check_first_record(path: str, label_offset: int, num_classes: int) -> None:
    """One shard's first record (see check_first_records); UsageError if the file is empty."""
    if not check_first_records([path], label_offset, num_classes):
        raise UsageError(f"--data_dir: TFRecord file {path} is empty")


def load(data_dir: str, label_offset: int, num_classes: int) -> TFRecordData:
    """List both splits' shards and validate the set before anything is written: one complete
    family per split, the manifest's plan and sizes, every shard's first record, train and
    validation disjoint, at least one example per split. UsageError on bad input."""
    info = read_info(data_dir)
    check_plan(data_dir, info, label_offset, num_classes)
    splits = {}
    for prefix in (TRAIN_PREFIX, EVAL_PREFIX):
        files = list_shards(data_dir, prefix)
        check_shard_family(data_dir, files, prefix)
        check_manifest(data_dir, info, files)
        splits[prefix] = (files, check_first_records(files, label_offset, num_classes))
    shared = set(splits[TRAIN_PREFIX][1]) & set(splits[EVAL_PREFIX][1])
    if shared:
        record = shared.pop()
        raise UsageError(f"--data_dir={data_dir}: {os.path.basename(splits[EVAL_PREFIX][1][record])} "
                         f"is a copy of {os.path.basename(splits[TRAIN_PREFIX][1][record])} (same size and first "
                         "record): the validation shards must not hold training data")
    train, evaluation = splits[TRAIN_PREFIX][0], splits[EVAL_PREFIX][0]
    loaded = TFRecordData(tuple(train), tuple(shard_counts(data_dir, train, info)),
                          tuple(evaluation), tuple(shard_counts(data_dir, evaluation, info)))
    for split, size in (("train", loaded.train_size), ("validation", loaded.eval_size)):
        if size < 1:
            raise UsageError(f"--data_dir={data_dir}: the {split}-* shards hold no records; at least "
                             "one example per split is needed")
    return loaded


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


def parse(serialized: tf.Tensor, label_offset: int, num_classes: int | None = None
          ) -> tuple[tf.Tensor, tf.Tensor]:
    """One serialized example -> (encoded image bytes, int32 label - offset); with `num_classes` a
    label outside [0, classes) fails the pipeline (never a zero one-hot target)."""
    features = tf.io.parse_single_example(serialized, _FEATURES)
    label = features[LABEL_KEY] - label_offset
    if num_classes is not None:
        in_range = tf.logical_and(label >= 0, label < num_classes)
        with tf.control_dependencies([tf.debugging.Assert(in_range, [_LABEL_ERROR, features[LABEL_KEY]])]):
            label = tf.identity(label)
    return features[IMAGE_KEY], tf.cast(label, tf.int32)


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
            tf.shape(batch)[:1], seed=tf.random.experimental.stateless_fold_in(epoch_seed, w))))).unbatch()

    records = tf.data.Dataset.range(first_epoch, 2 ** 62).flat_map(epoch).skip(offset)
    return tf.data.Dataset.zip((tf.data.Dataset.range(start, 2 ** 62), records))


def eval_records(files: Sequence[str], counts: Sequence[int], pipeline: int, pipelines: int
                 ) -> tf.data.Dataset:
    """This pipeline's share of the validation records, each exactly once, in file order."""
    mine, _, per_example = pipeline_files(files, counts, pipeline, pipelines)
    ds = tf.data.TFRecordDataset(mine, num_parallel_reads=min(len(mine), CYCLE_LENGTH))
    return ds.shard(pipelines, pipeline) if per_example else ds


def find_bad_record(files: Sequence[str], label_offset: int, num_classes: int
                    ) -> tuple[str, int, str] | None:
    """(shard, record index, problem) of the first unreadable or foreign record in `files`, read in
    order (the error path only: TensorFlow's read and parse errors do not name the file)."""
    for path in files:
        index = 0
        try:
            for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
                problem = record_problem(record, label_offset, num_classes)
                if problem:
                    return path, index, problem
                index += 1
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as err:
            return path, index, f"corrupt TFRecord data ({_first_line(err)})"
    return None


@contextlib.contextmanager
def reporting_record_errors(data_dir: str, records: TFRecordData | None = None, label_offset: int = 1,
                            num_classes: int | None = None) -> Iterator[None]:
    """Wrap the loop consuming a TFRecord dataset: a corrupt record, a foreign record layout or a
    label out of range met mid-run becomes one line naming the shard and record (found by reading
    the shards again) instead of a TensorFlow traceback; the checkpoints saved so far are kept."""
    try:
        yield
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as err:
        usage = records_error(err, data_dir, records, label_offset, num_classes)
        if usage is None:
            raise
        raise usage from None


def records_error(err: Exception, data_dir: str, records: TFRecordData | None = None,
                  label_offset: int = 1, num_classes: int | None = None) -> UsageError | None:
    """A TFRecord read/parse failure during training as a one-line UsageError (None if it is not one)."""
    message, text = _first_line(err), str(err)
    parse_error = any(s in text for s in ("Feature:", "Could not parse example", "Key: image/"))
    if records is not None and num_classes is not None and (
            parse_error or isinstance(err, tf.errors.DataLossError) or _LABEL_ERROR in text
            or re.search(r"decode|image file format|JPEG|PNG", text)):
        found = find_bad_record(records.train_files + records.eval_files, label_offset, num_classes)
        if found:
            path, index, problem = found
            return UsageError(f"--data_dir: record {index} of {path}: {problem}")
    if isinstance(err, tf.errors.DataLossError):
        return UsageError(f"--data_dir={data_dir}: corrupt TFRecord data ({message})")
    if parse_error or _LABEL_ERROR in text:
        return UsageError(f"--data_dir={data_dir}: records are not {IMAGE_KEY} + {LABEL_KEY} "
                          f"tf.train.Examples with labels in range ({message})")
    return None
