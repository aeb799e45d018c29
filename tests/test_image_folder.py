"""image_folder: listing a generated JPEG/PNG tree, labels and class names, decoding and resizing,
and one-line UsageErrors for broken trees and corrupt files."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from convmixer_dist.data import image_folder
from convmixer_dist.errors import UsageError

CLASSES = ("zebra", "ant", "cat")  # listed out of order on purpose: labels follow sorted names
COLORS = {"ant": (250, 10, 10), "cat": (10, 250, 10), "zebra": (10, 10, 250)}


def _write(path: str, image: np.ndarray) -> None:
    data = tf.io.encode_png(image) if path.endswith(".png") else tf.io.encode_jpeg(image, quality=95)
    tf.io.write_file(path, data)


def _make_tree(root, per_class=3, splits=("train", "val")) -> str:
    """Solid-colour images per class with varied sizes and both formats (and uppercase .JPG)."""
    for split in splits:
        for name in CLASSES:
            folder = os.path.join(root, split, name)
            os.makedirs(folder)
            for i in range(per_class):
                ext = (".png", ".jpg", ".JPG")[i % 3]
                image = np.zeros((24 + 8 * i, 40, 3), np.uint8) + np.array(COLORS[name], np.uint8)
                _write(os.path.join(folder, f"img{i}{ext}"), image)
            open(os.path.join(folder, "notes.txt"), "w").write("not an image")  # ignored
    return str(root)


def test_lists_tree_with_sorted_classes_and_matching_labels(tmp_path):
    root = _make_tree(tmp_path)
    splits, class_names = image_folder.list_image_folder_splits(root)
    assert class_names == ["ant", "cat", "zebra"]
    for split in ("train", "val"):
        paths, labels = splits[split]
        assert len(paths) == 9 and labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert all(os.path.basename(os.path.dirname(p)) == class_names[l] for p, l in zip(paths, labels))
        assert not any(p.endswith(".txt") for p in paths)


def _decoded(paths, labels, image_size):
    """The evaluation pipeline's per-example decode (pipeline.py maps `decode_and_resize` the same way)."""
    return tf.data.Dataset.from_tensor_slices((list(paths), list(labels))).map(
        lambda path, label: (image_folder.decode_and_resize(path, image_size), label))


def test_dataset_decodes_resizes_and_keeps_labels(tmp_path):
    root = _make_tree(tmp_path)
    splits, class_names = image_folder.list_image_folder_splits(root)
    dataset = _decoded(*splits["train"], image_size=16)
    assert dataset.element_spec[0].shape == (16, 16, 3)
    seen = 0
    for image, label in dataset.as_numpy_iterator():
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8
        # Solid colour survives decode (JPEG is lossy: allow a few levels) and resize.
        np.testing.assert_allclose(image.reshape(-1, 3).mean(0), COLORS[class_names[label]], atol=6)
        seen += 1
    assert seen == 9


@pytest.mark.parametrize("breakage,expected", [
    ("no_dir", r"--data_dir='?.*missing_dir.*not a directory"),
    ("no_val", r"--data_dir=.*missing the 'val' split"),
    ("empty_class", r"class folder .*train.cat has no"),
    ("no_classes", r"has no class subfolders"),
    ("val_mismatch", r"do not match the train split .*missing: \['cat'\].*unexpected: \['dog'\]"),
])
def test_broken_trees_raise_one_line_usage_errors(tmp_path, breakage, expected):
    root = str(tmp_path / "data")
    if breakage == "no_dir":
        root = str(tmp_path / "missing_dir")
    elif breakage == "no_val":
        _make_tree(root, splits=("train",))
    elif breakage == "empty_class":
        _make_tree(root)
        for f in os.listdir(os.path.join(root, "train", "cat")):
            if not f.endswith(".txt"):
                os.remove(os.path.join(root, "train", "cat", f))
    elif breakage == "no_classes":
        os.makedirs(os.path.join(root, "train"))
        os.makedirs(os.path.join(root, "val"))
    elif breakage == "val_mismatch":
        _make_tree(root)
        os.rename(os.path.join(root, "val", "cat"), os.path.join(root, "val", "dog"))
    with pytest.raises(UsageError, match=expected) as info:
        image_folder.list_image_folder_splits(root)
    assert "\n" not in str(info.value)


def test_non_image_file_is_reported_up_front_by_name(tmp_path):
    root = _make_tree(tmp_path)
    bad = os.path.join(root, "val", "ant", "broken.jpg")
    open(bad, "wb").write(b"<html>404 not found</html>")
    with pytest.raises(UsageError, match=r"corrupt image file .*val/ant/broken\.jpg"):
        image_folder.list_image_folder_splits(root)
    open(bad, "wb").close()  # empty file
    with pytest.raises(UsageError, match=r"broken\.jpg: empty file"):
        image_folder.list_image_folder_splits(root)


def _consume(paths, labels):
    with image_folder.reporting_corrupt_files(paths):
        for _ in _decoded(paths, labels, 8):
            pass


def test_file_replaced_after_listing_is_named_by_the_pipeline(tmp_path):
    root = _make_tree(tmp_path)
    splits, _ = image_folder.list_image_folder_splits(root)
    paths, labels = splits["train"]
    open(paths[4], "wb").write(b"GARBAGE!" * 10)
    with pytest.raises(UsageError, match="corrupt image file " + paths[4]):
        _consume(paths, labels)


def test_truncated_jpeg_is_named(tmp_path):
    root = _make_tree(tmp_path)
    splits, _ = image_folder.list_image_folder_splits(root)
    paths, labels = splits["train"]
    jpeg = next(p for p in paths if p.lower().endswith(".jpg"))
    data = open(jpeg, "rb").read()
    open(jpeg, "wb").write(data[: len(data) // 2])  # a partial download: no end-of-image marker
    with pytest.raises(UsageError, match=f"corrupt image file {jpeg}: truncated"):
        image_folder.list_image_folder_splits(root)  # found up front, before anything is written
    open(jpeg, "wb").write(data[: len(data) // 2] + b"\xff\xd9")  # broken body, intact ends
    image_folder.list_image_folder_splits(root)  # the cheap check cannot see this one ...
    with pytest.raises(UsageError, match=f"corrupt image file {jpeg}: cannot be decoded"):
        _consume(paths, labels)  # ... the pipeline's decode error is mapped to the file


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP"])
def test_truncated_files_of_every_format_are_found_up_front(tmp_path, fmt):
    path = str(tmp_path / f"x.{fmt.lower()}")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(path, format=fmt)
    image_folder.check_image_files([path])  # the intact file passes
    data = open(path, "rb").read()
    open(path, "wb").write(data[:60])
    with pytest.raises(UsageError, match=rf"corrupt image file {path}: truncated \(60 bytes"):
        image_folder.check_image_files([path])


def test_save_and_load_class_names(tmp_path):
    model_dir = str(tmp_path / "model")
    path = image_folder.save_class_names(model_dir, ["ant", "cat"])
    assert path == os.path.join(model_dir, "class_names.json")
    assert json.load(open(path)) == ["ant", "cat"]
    assert image_folder.load_class_names(model_dir) == ["ant", "cat"]
    assert image_folder.load_class_names(str(tmp_path)) is None


def test_rrc_training_crops_each_original_image_and_resumes_exactly(tmp_path):
    # --augment=rrc on an image folder: the crop is cut from the decoded original (per example,
    # seeded by the stream position), not from a pre-resized square; resume reproduces the stream.
    from convmixer_dist.data import pipeline as data
    from convmixer_dist.config import derive
    from helpers import tiny_config

    root = _make_tree(tmp_path / "tree", per_class=4)
    config = tiny_config(str(tmp_path / "run"), dataset="image_folder", data_dir=root, num_classes=3,
                         image_size=16, global_batch_size=4, augment="rrc", crop_scale=0.08,
                         crop_ratio="0.75,1.3333333", eval_crop_fraction=0.875)
    arrays = data.load(config)
    derived = derive(config, 1, *data.split_sizes(config, arrays))
    strategy = tf.distribute.get_strategy()

    def batches(start, count):
        iterator = iter(data.train_dataset(strategy, config, derived, arrays, start))
        return [next(iterator) for _ in range(count)]

    full = batches(0, 6)
    assert full[0][0].shape == (4, 16, 16, 3)
    for (a, la), (b, lb) in zip(full[2:], batches(2, 4)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_array_equal(la.numpy(), lb.numpy())
    # Solid-colour images: any crop of the original keeps the class colour (flip changes nothing).
    mean, std = (np.array(v) for v in data.normalization(config))
    names = list(arrays.class_names)
    for images, labels in full:
        pixels = images.numpy() * std + mean
        for image, label in zip(pixels, labels.numpy().argmax(-1)):  # one-hot targets
            np.testing.assert_allclose(image.mean((0, 1)), COLORS[names[label]], atol=6)
    eval_images, _ = next(iter(data.eval_dataset(strategy, config, derived, arrays)))
    assert eval_images.shape[1:] == (16, 16, 3)
