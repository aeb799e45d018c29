"""Issue 22, data rows: a TFRecord conversion under a plan (an interrupted conversion continues only
under the same plan, else one line and nothing changed) and shard sets validated structurally
before training (families, manifest, every shard's first record, labels in range in the pipeline,
a bad later shard named with its record). Tiny trees of 8x8 PNGs, in process."""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tempfile

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings, strategies as st

from convmixer_dist import rundir
from convmixer_dist.data import tfrecord
from convmixer_dist.commands import make_tfrecords
from convmixer_dist.errors import UsageError
from helpers import run_cli


def make_tree(root, classes=("a", "b", "c"), per_class=(4, 2), seed=0) -> str:
    """DIR/{train,val}/<class>/*.png: 8x8 PNGs of random pixels (every image different)."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "val"), per_class):
        for name in classes:
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(count):
                image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                tf.io.write_file(os.path.join(root, split, name, f"{split}_{name}{i}.png"),
                                 tf.io.encode_png(image))
    return str(root)


def files(directory) -> dict[str, bytes]:
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))
            if os.path.isfile(os.path.join(directory, n))}


def convert(source, output, shards=4, eval_shards=2, **kwargs) -> dict:
    return make_tfrecords.convert(source, str(output), shards, eval_shards, out=io.StringIO(), **kwargs)


class Interrupted(BaseException):
    """A kill at some point of the conversion (not an Exception: nothing may catch it)."""


def interrupt_after(monkeypatch, events: int) -> None:
    """Make the conversion stop at its `events`-th step (an example written, a manifest or class-list
    write), as a kill there would."""
    count = [0]

    def tick():
        count[0] += 1
        if count[0] > events:
            raise Interrupted

    def wrap(function):
        def wrapped(*args, **kwargs):
            tick()
            return function(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(make_tfrecords, "make_example", wrap(make_tfrecords.make_example))
    monkeypatch.setattr(rundir, "write_json", wrap(rundir.write_json))
    monkeypatch.setattr(rundir, "write_text", wrap(rundir.write_text))


def interrupted_conversion(tmp_path, monkeypatch, events=9):
    source = make_tree(tmp_path / "tree")
    output = tmp_path / "records"
    with monkeypatch.context() as patch:
        interrupt_after(patch, events)
        with pytest.raises(Interrupted):
            convert(source, output)
    return source, output


def test_an_interrupted_conversion_rerun_after_a_class_folder_was_added_refuses(tmp_path, monkeypatch):
    source, output = interrupted_conversion(tmp_path, monkeypatch)
    before = files(output)
    assert any(n.startswith("train-") for n in before)  # some shards were finished
    with pytest.raises(UsageError, match=r"holds a conversion under another plan \(classes added \['aa'\]"):
        make_tree(tmp_path / "tree", classes=("aa",), seed=1)
        convert(source, output)
    assert files(output) == before  # nothing written, labels never mixed
    with pytest.raises(UsageError, match="the conversion is unfinished"):
        tfrecord.load(str(output), 1, 3)  # training refuses the half conversion


def test_an_interrupted_conversion_rerun_with_another_label_offset_refuses(tmp_path, monkeypatch):
    source, output = interrupted_conversion(tmp_path, monkeypatch)
    before = files(output)
    with pytest.raises(UsageError, match=r"another plan \(label_offset 1 -> 0\)"):
        convert(source, output, label_offset=0)
    assert files(output) == before
    convert(source, output, label_offset=0, overwrite=True)  # --overwrite rewrites everything
    info = json.loads((output / "tfrecord_info.json").read_text())
    assert info["complete"] and info["plan"]["label_offset"] == 0
    labels = {tf.train.Example.FromString(r.numpy()).features.feature["image/class/label"].int64_list.value[0]
              for r in tf.data.TFRecordDataset(tfrecord.list_shards(str(output), "train-"))}
    assert labels == {0, 1, 2}


def test_a_rerun_with_another_shard_count_refuses_and_a_stale_family_is_never_read(tmp_path, monkeypatch):
    source, output = interrupted_conversion(tmp_path, monkeypatch)
    with pytest.raises(UsageError, match=r"another plan \(shards 4 -> 3\)"):
        convert(source, output, shards=3)
    # A stale -of-00004 family beside a finished -of-00003 conversion (copied in by hand).
    fresh = tmp_path / "fresh"
    convert(source, fresh, shards=3)
    shutil.copy(output / "train-00000-of-00004", fresh / "train-00000-of-00004")
    with pytest.raises(UsageError, match=r"train-\* shards of 2 conversions mixed \(-of-00003 \(3 files\), "
                                         r"-of-00004 \(1 files\)\)"):
        tfrecord.load(str(fresh), 1, 3)
    os.remove(fresh / "train-00000-of-00004")
    os.remove(fresh / "train-00001-of-00003")
    with pytest.raises(UsageError, match="missing train-00001-of-00003"):
        tfrecord.load(str(fresh), 1, 3)


def test_the_same_command_finishes_an_interrupted_conversion_byte_identically(tmp_path, monkeypatch):
    source, output = interrupted_conversion(tmp_path, monkeypatch, events=14)
    log = io.StringIO()
    make_tfrecords.convert(source, str(output), 4, 2, out=log)
    assert "finished shards of plan" in log.getvalue()
    reference = tmp_path / "reference"
    convert(source, reference)
    ours, theirs = files(output), files(reference)
    assert ours.keys() == theirs.keys() and all(ours[k] == theirs[k] for k in ours if k != "tfrecord_info.json")
    assert (json.loads(ours["tfrecord_info.json"])["shards"] == json.loads(theirs["tfrecord_info.json"])["shards"])


def test_output_inside_the_input_tree_and_unreadable_image_entries_are_refused(tmp_path):
    source = make_tree(tmp_path / "tree")
    with pytest.raises(UsageError, match="is inside --data_dir"):
        convert(source, tmp_path / "tree" / "train" / "shards")
    assert sorted(os.listdir(tmp_path / "tree" / "train")) == ["a", "b", "c"]
    os.makedirs(tmp_path / "tree" / "train" / "a" / "x.png")  # a directory with an image name
    with pytest.raises(UsageError, match=r"train/a/x.png is not a readable image file \(Is a directory\)"):
        convert(source, tmp_path / "out")
    os.rmdir(tmp_path / "tree" / "train" / "a" / "x.png")
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "tree" / "val" / "b" / "gone.jpg")
    with pytest.raises(UsageError, match=r"val/b/gone.jpg is not a readable image file"):
        convert(source, tmp_path / "out")


def _write_records(path, examples) -> None:
    with tf.io.TFRecordWriter(str(path)) as writer:
        for feature in examples:
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


def _bytes(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _ints(*values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


PNG = bytes(tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy())


@pytest.fixture
def shards(tmp_path):
    """A finished conversion without its manifest (as third-party shards come)."""
    output = tmp_path / "records"
    convert(make_tree(tmp_path / "tree"), output)
    os.remove(output / "tfrecord_info.json")
    return output


@pytest.mark.parametrize("layout, problem", [
    ({"image": _bytes(PNG), "label": _ints(1)}, "its features lack image/encoded"),  # TFDS keys
    ({"image/encoded": _bytes(PNG), "image/class/label": tf.train.Feature(
        float_list=tf.train.FloatList(value=[1.0]))}, "its features lack image/encoded"),  # a float label
    ({"image/encoded": _bytes(PNG), "image/class/label": _ints(1, 2)}, "its features lack image/encoded"),
    ({"image/encoded": _bytes(b"<html>not found</html>"), "image/class/label": _ints(1)},
     "image/encoded is not JPEG/PNG"),
    ({"image/encoded": _bytes(PNG), "image/class/label": _ints(0)}, r"image/class/label=0, outside 0..2 after "
                                                                   r"--tfrecord_label_offset=1"),
])
def test_a_later_shard_with_another_layout_is_one_line_naming_it(shards, layout, problem):
    _write_records(shards / "train-00003-of-00004", [layout])
    with pytest.raises(UsageError, match=f"record 0 of .*train-00003-of-00004: {problem}"):
        tfrecord.load(str(shards), 1, 3)


def test_truncated_gzipped_or_empty_shards(shards, tmp_path):
    original = (shards / "train-00002-of-00004").read_bytes()
    (shards / "train-00002-of-00004").write_bytes(gzip.compress(original))
    with pytest.raises(UsageError, match=r"corrupt TFRecord file .*train-00002-of-00004 \(the first record's framing"):
        tfrecord.load(str(shards), 1, 3)
    # Truncated: counting its records (no manifest) names it before anything is written.
    (shards / "train-00002-of-00004").write_bytes(original[:-30])
    with pytest.raises(UsageError, match=r"corrupt TFRecord file .*train-00002-of-00004 \(truncated record"):
        tfrecord.load(str(shards), 1, 3)
    # With the manifest the size alone tells, before anything is read.
    complete = tmp_path / "complete"
    convert(make_tree(tmp_path / "tree"), complete)
    shard = complete / "train-00002-of-00004"
    blob = shard.read_bytes()
    shard.write_bytes(blob[:-30])
    with pytest.raises(UsageError, match=r"train-00002-of-00004 has \d+ bytes, the manifest says"):
        tfrecord.load(str(complete), 1, 3)
    # A flipped byte (same size) is only found while reading: the error names shard and record.
    damaged = bytearray(blob)
    damaged[-20] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    loaded = tfrecord.load(str(complete), 1, 3)
    with pytest.raises(UsageError, match=r"record \d of .*train-00002-of-00004: corrupt TFRecord data"):
        with tfrecord.reporting_record_errors(str(complete), loaded, 1, 3):
            for _ in tf.data.TFRecordDataset(list(loaded.train_files)):
                pass
    # Every validation shard empty: no test example.
    (shards / "train-00002-of-00004").write_bytes(original)
    for name in ("validation-00000-of-00002", "validation-00001-of-00002"):
        (shards / name).write_bytes(b"")
    with pytest.raises(UsageError, match="the validation-\\* shards hold no records"):
        tfrecord.load(str(shards), 1, 3)


def test_a_copied_shard_and_a_wrong_offset_are_refused_before_training(shards, tmp_path):
    shutil.copy(shards / "train-00001-of-00004", shards / "validation-00001-of-00002")
    with pytest.raises(UsageError, match="validation-00001-of-00002 is a copy of train-00001-of-00004"):
        tfrecord.load(str(shards), 1, 3)
    zero_based = tmp_path / "zero"
    convert(make_tree(tmp_path / "tree"), zero_based, label_offset=0)
    with pytest.raises(UsageError, match=r"--tfrecord_label_offset=1: the shards .* were written with "
                                         r"--label_offset=0"):
        tfrecord.load(str(zero_based), 1, 3)


def test_a_label_out_of_range_fails_the_pipeline_with_the_shard_and_record(shards):
    # The first record is fine (the start-up check passes); the second has label 0 - 1 = -1.
    good = {"image/encoded": _bytes(PNG), "image/class/label": _ints(1)}
    _write_records(shards / "train-00003-of-00004", [good, {**good, "image/class/label": _ints(0)}])
    loaded = tfrecord.load(str(shards), 1, 3)
    labels = tf.data.TFRecordDataset(list(loaded.train_files)).map(lambda r: tfrecord.parse(r, 1, 3)[1])
    with pytest.raises(UsageError, match=r"record 1 of .*train-00003-of-00004: image/class/label=0, outside"):
        with tfrecord.reporting_record_errors(str(shards), loaded, 1, 3):
            for _ in labels:
                pass


def test_a_refused_conversion_is_one_line_on_the_command_line(tmp_path, monkeypatch):
    source, output = interrupted_conversion(tmp_path, monkeypatch)
    result = run_cli("convmixer_dist.commands.make_tfrecords", f"--data_dir={source}", f"--output={output}",
                     "--shards=4", "--eval_shards=2", "--seed=5")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: --output={output} holds a conversion under another plan (seed 0 -> 5)")


MUTATIONS = ("none", "class added", "image added", "label_offset", "shards", "seed", "overwrite")


@settings(max_examples=12, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=st.integers(0, 30), mutation=st.sampled_from(MUTATIONS), second_kill=st.integers(0, 30))
def test_property_random_interruptions_end_in_one_plan_or_a_refusal(monkeypatch, events, mutation, second_kill):
    """Kill the conversion at a random step (twice: once more during a rerun), change the tree or
    the flags, rerun: the shards then agree with a fresh conversion under one plan, or the rerun
    refuses and changes nothing."""
    root = tempfile.mkdtemp()
    try:
        source, output = make_tree(os.path.join(root, "tree")), os.path.join(root, "records")
        for kill in (events, second_kill):
            with monkeypatch.context() as patch:
                interrupt_after(patch, kill)
                try:
                    convert(source, output)
                except Interrupted:
                    pass
        args = dict(shards=4, label_offset=1, seed=0, overwrite=False)
        if mutation == "class added":
            make_tree(os.path.join(root, "tree"), classes=("aa",), seed=1)
        elif mutation == "image added":
            make_tree(os.path.join(root, "tree"), classes=("b",), per_class=(5, 2), seed=2)
        elif mutation in ("label_offset", "seed"):
            args[mutation] = 2
        elif mutation == "shards":
            args["shards"] = 3
        elif mutation == "overwrite":
            args["overwrite"] = True
        before = files(output) if os.path.isdir(output) else {}
        try:
            convert(source, output, **args)
        except UsageError:
            assert files(output) == before  # refused: nothing changed
            assert mutation not in ("none", "overwrite")
            return
        reference = os.path.join(root, "reference")
        convert(source, reference, **{**args, "overwrite": False})
        ours, theirs = files(output), files(reference)
        assert ours.keys() == theirs.keys()
        assert all(ours[n] == theirs[n] for n in ours if n != "tfrecord_info.json")
        manifest = json.loads(ours["tfrecord_info.json"])
        assert manifest["complete"] and manifest["shards"] == json.loads(theirs["tfrecord_info.json"])["shards"]
        classes = len(manifest["plan"]["class_names"])
        assert tfrecord.load(output, args["label_offset"], classes).train_size == manifest["plan"]["train_images"]
    finally:
        shutil.rmtree(root)


def test_training_on_a_bad_later_shard_stops_in_one_line_and_keeps_the_checkpoint(shards, tmp_path):
    import contextlib

    from convmixer_dist import strategy as strategy_lib
    from convmixer_dist.training.loop import train_and_evaluate
    from helpers import tiny_config

    good = {"image/encoded": _bytes(PNG), "image/class/label": _ints(1)}
    _write_records(shards / "train-00003-of-00004", [good, good, {**good, "image/class/label": _ints(7)}])
    config = tiny_config(str(tmp_path / "run"), dataset="tfrecord", data_dir=str(shards), num_classes=3,
                         image_size=8, global_batch_size=4, train_steps=6, steps_per_loop=1,
                         checkpoint_every_steps=1, augment="none")
    with pytest.raises(UsageError, match=r"record 2 of .*train-00003-of-00004: image/class/label=7, outside"):
        with contextlib.redirect_stdout(io.StringIO()):
            train_and_evaluate(config, strategy_lib.create_strategy(config))
    assert os.path.exists(tmp_path / "run" / "checkpoints" / "ckpt-0.index")  # the last good one kept
