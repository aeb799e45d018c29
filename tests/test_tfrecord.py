"""--dataset=tfrecord and the make_tfrecords converter: round trip from a generated image folder
(labels, class names, offset), atomic and resumable conversion, per-worker shards that together cover
every example once per epoch, exact mid-epoch resume, and one-line errors for bad records."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from convmixer_dist.data import pipeline as data, tfrecord
from convmixer_dist.commands import make_tfrecords
from convmixer_dist.config import derive
from convmixer_dist.errors import UsageError
from helpers import run_cli, tiny_config

CLASSES = ("zebra", "ant", "cat")
COLORS = {"ant": (250, 10, 10), "cat": (10, 250, 10), "zebra": (10, 10, 250)}


def make_image_folder(root, per_class=(5, 2)) -> str:
    """Solid-colour JPEG/PNG images of varied sizes per class, train and val splits."""
    for split, count in zip(("train", "val"), per_class):
        for name in CLASSES:
            os.makedirs(os.path.join(root, split, name))
            for i in range(count):
                image = np.zeros((20 + 4 * i, 28, 3), np.uint8) + np.array(COLORS[name], np.uint8)
                png = i % 2 == 1
                encoded = tf.io.encode_png(image) if png else tf.io.encode_jpeg(image, quality=95)
                tf.io.write_file(os.path.join(root, split, name, f"{name}{i}.{'png' if png else 'jpg'}"),
                                 encoded)
    return str(root)


def _convert(tmp_path, shards=3, eval_shards=2, label_offset=1):
    source = make_image_folder(tmp_path / "folder")
    output = str(tmp_path / "records")
    make_tfrecords.convert(source, output, shards, eval_shards, label_offset, out=io.StringIO())
    return source, output


def _records(files):
    return [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(files)]


def _filename(example) -> str:
    return example.features.feature["image/filename"].bytes_list.value[0].decode()


def test_round_trip_keeps_labels_class_names_and_offset(tmp_path):
    _, output = _convert(tmp_path)
    names = sorted(os.listdir(output))
    assert names == ["class_names.json", "tfrecord_info.json", "train-00000-of-00003",
                     "train-00001-of-00003", "train-00002-of-00003", "validation-00000-of-00002",
                     "validation-00001-of-00002"]
    class_names = json.load(open(os.path.join(output, "class_names.json")))
    assert class_names == sorted(CLASSES)
    info = json.load(open(os.path.join(output, "tfrecord_info.json")))
    assert sum(v["records"] for k, v in info["shards"].items() if k.startswith("train")) == 15
    assert info["complete"] is True and info["plan"]["class_names"] == sorted(CLASSES)
    loaded = tfrecord.load(output, label_offset=1, num_classes=3)
    assert loaded.train_size == 15 and loaded.eval_size == 6
    assert list(loaded.train_counts) == [5, 5, 5]
    seen = set()
    for example in _records(loaded.train_files):
        stored = example.features.feature["image/class/label"].int64_list.value[0]
        name = _filename(example)
        assert class_names[stored - 1] == name.rstrip("0123456789.jpgn")  # 1-based as TF's tooling
        seen.add(name)
    assert len(seen) == 15
    # Training shards mix the classes (seeded shuffle), validation keeps file order.
    first_shard = {_filename(e).rstrip("0123456789.jpgn") for e in _records(loaded.train_files[:1])}
    assert len(first_shard) > 1
    # The pipeline's parse applies the offset and decodes the bytes as they were.
    encoded, label = tfrecord.parse(next(iter(tf.data.TFRecordDataset(loaded.eval_files))), 1)
    image = tf.io.decode_image(encoded, channels=3).numpy()
    assert int(label) == 0 and np.abs(image.mean((0, 1)) - COLORS["ant"]).max() < 6


def test_label_offset_zero_needs_the_matching_flag(tmp_path):
    _, output = _convert(tmp_path, label_offset=0)
    tfrecord.load(output, label_offset=0, num_classes=3)
    with pytest.raises(UsageError, match="--tfrecord_label_offset=1"):
        tfrecord.load(output, label_offset=1, num_classes=3)  # checks the first record's label


def test_conversion_is_atomic_per_shard_and_a_rerun_writes_only_what_is_missing(tmp_path):
    source, output = _convert(tmp_path)
    kept = os.path.join(output, "train-00000-of-00003")
    missing = os.path.join(output, "train-00002-of-00003")
    before = open(missing, "rb").read()
    os.remove(missing)
    open(missing + ".tmp", "wb").write(b"half a shard")  # an interrupted write
    mtime = os.stat(kept).st_mtime_ns
    log = io.StringIO()
    make_tfrecords.convert(source, output, 3, 2, out=log)
    assert "4 finished shards of plan" in log.getvalue() and "1 to write" in log.getvalue()
    assert os.stat(kept).st_mtime_ns == mtime and open(missing, "rb").read() == before
    assert not os.path.exists(missing + ".tmp")
    assert tfrecord.list_shards(output, "train-") == sorted(
        os.path.join(output, f"train-0000{i}-of-00003") for i in range(3))


@pytest.mark.parametrize("pipelines", [2, 4])  # 2: each reads its own files; 4 > 3 files: per record
def test_workers_read_disjoint_parts_that_cover_every_example_once_per_epoch(tmp_path, pipelines):
    _, output = _convert(tmp_path)
    loaded = tfrecord.load(output, 1, 3)
    per_worker = []
    for pipeline in range(pipelines):
        files, size, per_example = tfrecord.pipeline_files(loaded.train_files, loaded.train_counts,
                                                           pipeline, pipelines)
        assert per_example == (pipelines > 3)
        stream = tfrecord.train_records(loaded.train_files, loaded.train_counts, pipeline, pipelines,
                                        seed=4, start=0)
        records = [r for _, r in stream.take(size).as_numpy_iterator()]
        per_worker.append({_filename(tf.train.Example.FromString(r)) for r in records})
        assert len(per_worker[-1]) == size  # no repeats inside an epoch
    union = set().union(*per_worker)
    assert len(union) == 15 and sum(len(w) for w in per_worker) == 15


def test_resume_mid_epoch_reproduces_the_uninterrupted_stream(tmp_path):
    _, output = _convert(tmp_path)
    loaded = tfrecord.load(output, 1, 3)

    def stream(start, count):
        ds = tfrecord.train_records(loaded.train_files, loaded.train_counts, 1, 2, seed=9, start=start)
        return [(int(p), bytes(r)) for p, r in ds.take(count).as_numpy_iterator()]

    full = stream(0, 30)  # pipeline 1 of 2 reads 5 records per epoch: 6 epochs
    assert [p for p, _ in full] == list(range(30))
    epochs = [[r for _, r in full[i:i + 5]] for i in range(0, 30, 5)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs) and epochs[0] != epochs[1]
    for start in (3, 7, 12):
        assert stream(start, 30 - start) == full[start:]


def test_training_pipeline_from_tfrecords_resumes_exactly_with_crops(tmp_path):
    _, output = _convert(tmp_path)
    config = tiny_config(str(tmp_path / "run"), dataset="tfrecord", data_dir=output, num_classes=3,
                         image_size=16, global_batch_size=4, augment="rrc", crop_scale=0.08,
                         crop_ratio="0.75,1.3333333", randaug_n=1, randaug_m=9, eval_crop_fraction=0.875)
    arrays = data.load(config)
    assert list(arrays.class_names) == sorted(CLASSES)
    derived = derive(config, 1, *data.split_sizes(config, arrays))
    assert (derived.train_size, derived.eval_size, derived.steps_per_epoch) == (15, 6, 3)
    strategy = tf.distribute.get_strategy()

    def batches(start, count):
        iterator = iter(data.train_dataset(strategy, config, derived, arrays, start))
        return [[t.numpy() for t in next(iterator)] for _ in range(count)]

    full = batches(0, 5)
    assert full[0][0].shape == (4, 16, 16, 3)
    for a, b in zip(full[2:], batches(2, 3)):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    evaluated = [labels for _, labels in data.eval_dataset(strategy, config, derived, arrays)]
    assert sorted(np.concatenate(evaluated).tolist()) == [0, 0, 1, 1, 2, 2]


def test_corrupt_record_mid_run_is_one_line(tmp_path):
    _, output = _convert(tmp_path)
    shard = os.path.join(output, "train-00001-of-00003")
    blob = bytearray(open(shard, "rb").read())
    blob[len(blob) // 2] ^= 0xFF  # the record's CRC no longer matches
    open(shard, "wb").write(bytes(blob))
    loaded = tfrecord.load(output, 1, 3)  # counts come from tfrecord_info.json: not read yet
    stream = tfrecord.train_records(loaded.train_files, loaded.train_counts, 0, 1, seed=0, start=0)
    with pytest.raises(UsageError, match="corrupt TFRecord data"):
        with tfrecord.reporting_record_errors(output):
            for _ in stream.take(15):
                pass


def test_converter_command_prints_progress_and_bad_input_is_one_line(tmp_path):
    source = make_image_folder(tmp_path / "folder", per_class=(2, 1))
    result = run_cli("convmixer_dist.commands.make_tfrecords", f"--data_dir={source}",
                     f"--output={tmp_path / 'out'}", "--shards=2", "--eval_shards=1")
    assert result.returncode == 0, result.stderr
    assert "9/9 images" in result.stderr and "6 train images in 2 shards" in result.stderr
    bad = run_cli("convmixer_dist.commands.make_tfrecords", f"--data_dir={tmp_path / 'nope'}",
                  f"--output={tmp_path / 'out2'}", "--shards=2")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert bad.stderr.startswith("error: --data_dir") and not os.path.exists(tmp_path / "out2")
    too_many = run_cli("convmixer_dist.commands.make_tfrecords", f"--data_dir={source}",
                       f"--output={tmp_path / 'out3'}", "--shards=99")
    assert too_many.returncode == 2 and "--shards=99" in too_many.stderr


def test_trains_from_tfrecords_with_the_imagenet_recipe_and_saves_class_names(tmp_path):
    import contextlib

    from convmixer_dist import strategy as strategy_lib
    from convmixer_dist.training.loop import train_and_evaluate

    _, output = _convert(tmp_path)
    config = tiny_config(str(tmp_path / "run"), dataset="tfrecord", data_dir=output, num_classes=3,
                         image_size=16, global_batch_size=4, train_steps=4, steps_per_loop=2,
                         augment="rrc", crop_scale=0.08, crop_ratio="0.75,1.3333333", randaug_n=2,
                         randaug_m=27, randaug_mstd=1.5, erase_prob=0.25, erase_mode="pixel",
                         mixup_alpha=0.5, cutmix_alpha=0.5, eval_crop_fraction=0.96,
                         wd_exclude_bias_bn=True, grad_accum_steps=2, label_smoothing=0.1, clip_norm=1.0)
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train_and_evaluate(config, strategy_lib.create_strategy(config))
    assert summary["steps"] == 4 and summary["eval_examples"] == 6
    assert json.load(open(tmp_path / "run" / "class_names.json")) == sorted(CLASSES)
