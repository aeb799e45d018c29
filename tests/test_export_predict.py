"""export + predict: the exported SavedModel and .keras reproduce the checkpoint's predictions, take
uint8 images of any batch and size, carry class names; predict prints named top-k; bad input is one
line with exit code 2."""
from __future__ import annotations

import io
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from convmixer_dist.data import pipeline as data
from convmixer_dist.commands import export, predict, saved_run
from convmixer_dist.errors import UsageError
from helpers import run_cli
from trained_run import NUM_CLASSES, TRAIN_STEPS, trained_run

IMAGE_SIZE = 16  # the shared run's --image_size


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model_dir, _ = trained_run(tmp_path_factory)
    output = str(tmp_path_factory.mktemp("export") / "out")
    info = export.export_run(saved_run.load_run_config(model_dir), output, out=io.StringIO())
    return model_dir, output, info


def _checkpoint_probabilities(model_dir, images):
    config = saved_run.load_run_config(model_dir)
    model, _ = saved_run.restore_model(config, saved_run.checkpoint_path(model_dir))
    normalized = data.normalize(images, *data.normalization(config))  # the eval pipeline's
    return tf.nn.softmax(model(normalized, training=False)).numpy()


def test_export_layout_and_metadata(exported):
    _, output, info = exported
    assert sorted(os.listdir(output)) == ["class_names.json", "export.json", "model.keras", "saved_model"]
    assert json.load(open(os.path.join(output, "class_names.json"))) == [f"class_{i}" for i in range(4)]
    assert json.load(open(os.path.join(output, "export.json"))) == info
    assert info["step"] == TRAIN_STEPS and info["image_size"] == IMAGE_SIZE and info["num_classes"] == 4


def test_reloaded_models_reproduce_the_checkpoint(exported):
    model_dir, output, _ = exported
    images = np.random.default_rng(0).integers(0, 256, (6, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    expected = _checkpoint_probabilities(model_dir, images)
    saved = tf.saved_model.load(os.path.join(output, "saved_model"))
    from_saved = saved.serve(tf.constant(images)).numpy()
    from_keras = keras.models.load_model(os.path.join(output, "model.keras"))(images).numpy()
    np.testing.assert_allclose(from_saved, expected, atol=1e-6)
    np.testing.assert_allclose(from_keras, expected, atol=1e-6)
    # Inference mode regardless of the batch: one image alone gets the same answer.
    np.testing.assert_allclose(saved.serve(tf.constant(images[:1])).numpy(), expected[:1], atol=1e-6)
    # Any size: a non-square larger image is centre-cropped and resized to the model's input.
    big = np.random.default_rng(1).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    probabilities = saved.serve(tf.constant(big)).numpy()
    assert probabilities.shape == (3, NUM_CLASSES)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    upsized = np.repeat(np.repeat(images[:2], 3, axis=1), 3, axis=2)  # 48x48, nearest-neighbour x3
    assert (saved.serve(tf.constant(upsized)).numpy().argmax(1) == expected[:2].argmax(1)).all()


def test_image_file_runs_export_their_evaluation_transform(tmp_path):
    """An image_folder/tfrecord run's export sees an image as `evaluate` does: timm's crop_pct
    transform (image_decode.center_crop), then the normalization; also after a .keras round trip."""
    from convmixer_dist import fused
    from convmixer_dist.data import image_decode
    from convmixer_dist.model import build_convmixer

    model = build_convmixer(hidden_dim=8, depth=1, kernel_size=3, patch_size=2, num_classes=3,
                            image_size=IMAGE_SIZE, kernels=fused.KernelChoice(True, True, True))
    mean, std = (120.0, 110.0, 100.0), (60.0, 61.0, 62.0)
    classifier = export.build_serving_model(model, IMAGE_SIZE, mean, std, eval_crop_fraction=0.875)
    images = np.random.default_rng(2).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    cropped = image_decode.center_crop(tf.constant(images), IMAGE_SIZE, 0.875)
    expected = tf.nn.softmax(model(data.normalize(cropped, mean, std), training=False)).numpy()
    np.testing.assert_allclose(classifier(images).numpy(), expected, atol=1e-6)
    path = str(tmp_path / "model.keras")
    classifier.save(path)
    np.testing.assert_allclose(keras.models.load_model(path)(images).numpy(), expected, atol=1e-6)
    # Array datasets keep the bilinear centre square: different pixels for a non-square image.
    plain = export.build_serving_model(model, IMAGE_SIZE, mean, std)
    assert np.abs(plain(images).numpy() - expected).max() > 1e-4


def test_image_folder_run_exports_and_predicts_through_its_evaluation_crop(tmp_path):
    """End to end: a tiny image-folder run, exported (SavedModel, what predict loads) with
    --eval_crop_fraction given to export overriding the run's, matches the checkpoint on the
    evaluation transform of a non-square photo-sized image."""
    import contextlib

    from convmixer_dist import strategy as strategy_lib
    from convmixer_dist.data import image_decode
    from convmixer_dist.training.loop import train_and_evaluate
    from helpers import tiny_config

    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        for name in ("ant", "bee"):
            os.makedirs(tmp_path / "tree" / split / name)
            for i in range(4):
                pixels = rng.integers(0, 256, (30 + 4 * i, 44, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "tree" / split / name / f"{i}.jpg")
    model_dir = str(tmp_path / "run")
    config = tiny_config(model_dir, dataset="image_folder", data_dir=str(tmp_path / "tree"), num_classes=2,
                         global_batch_size=4, train_steps=2, steps_per_loop=1, checkpoint_every_steps=2,
                         eval_crop_fraction=0.875)
    with contextlib.redirect_stdout(io.StringIO()):
        train_and_evaluate(config, strategy_lib.create_strategy(config))
    output = str(tmp_path / "export")
    done = run_cli("convmixer_dist.commands.export", f"--model_dir={model_dir}", f"--output={output}",
                   "--eval_crop_fraction=0.5")
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.load(open(os.path.join(output, "export.json")))
    assert "image_size / 0.5 bicubic" in info["input"]

    loaded, names = predict.load_classifier(output)
    assert names == ["ant", "bee"]
    image = rng.integers(0, 256, (1, 37, 61, 3), dtype=np.uint8)
    run = saved_run.load_run_config(model_dir)
    model, _ = saved_run.restore_model(run, saved_run.checkpoint_path(model_dir))
    cropped = image_decode.center_crop(tf.constant(image), run.image_size, 0.5)
    expected = tf.nn.softmax(model(data.normalize(cropped, *saved_run.normalization(run)), training=False))
    np.testing.assert_allclose(loaded.serve(tf.constant(image)).numpy(), expected.numpy(), atol=1e-6)


def test_export_refuses_a_foreign_output_directory(exported, tmp_path):
    model_dir, _, _ = exported
    (tmp_path / "precious.txt").write_text("not an export")
    with pytest.raises(UsageError, match="exists and is not an earlier export"):
        export.export_run(saved_run.load_run_config(model_dir), str(tmp_path), out=io.StringIO())


def _write_images(directory):
    rng = np.random.default_rng(2)
    paths = []
    for name, size in (("a.png", (16, 16)), ("b.jpg", (30, 20))):
        path = os.path.join(directory, name)
        Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_predict_returns_named_top_k(exported, tmp_path):
    _, output, _ = exported
    paths = _write_images(str(tmp_path))
    results = predict.predict_files(output, paths, top_k=3)
    saved = tf.saved_model.load(os.path.join(output, "saved_model"))
    for path, top in zip(paths, results):
        assert len(top) == 3 and all(name.startswith("class_") for name, _ in top)
        probabilities = [p for _, p in top]
        assert probabilities == sorted(probabilities, reverse=True)
        image = tf.io.decode_image(tf.io.read_file(path), channels=3)[None]
        expected = saved.serve(image).numpy()[0]
        assert top[0] == (f"class_{expected.argmax()}", pytest.approx(float(expected.max())))
    out = io.StringIO()
    predict.print_predictions(paths, results, out)
    assert out.getvalue().splitlines()[0] == paths[0] and "1. class_" in out.getvalue()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(UsageError, match="broken.png: not a decodable"):
        predict.predict_files(output, [str(broken)])
    with pytest.raises(UsageError, match="--model=.*expected an export directory"):
        predict.predict_files(str(tmp_path), paths)


def test_commands_predict_and_reject_bad_input_with_one_line(exported, tmp_path):
    model_dir, output, _ = exported
    paths = _write_images(str(tmp_path))
    ok = run_cli("convmixer_dist.commands.predict", f"--model={output}", "--top_k=2", *paths)
    assert ok.returncode == 0, ok.stderr[-2000:]
    lines = ok.stdout.splitlines()
    assert lines[0] == paths[0] and lines[1].startswith("  1. class_") and len(lines) == 6
    missing = run_cli("convmixer_dist.commands.predict", f"--model={output}", str(tmp_path / "nope.jpg"))
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == [f"error: {tmp_path / 'nope.jpg'}: no such image file"]
    foreign = run_cli("convmixer_dist.commands.export", f"--model_dir={model_dir}", f"--output={paths[0]}")
    assert foreign.returncode == 2
    assert foreign.stderr.splitlines() == [
        f"error: --output={paths[0]} is a file; expected a directory for the export"]


@pytest.mark.parametrize("names,message", [("{broken", "not a readable JSON list of class names"),
                                           ('["a", "b"]', "2 names for a model of 4 classes")])
def test_predict_with_a_broken_or_short_class_names_file_is_one_usage_error(exported, tmp_path, names,
                                                                            message):
    import shutil

    _, output, _ = exported
    copy = str(tmp_path / "export")
    shutil.copytree(output, copy)
    with open(os.path.join(copy, "class_names.json"), "w") as f:
        f.write(names)
    with pytest.raises(UsageError, match=message):
        predict.predict_files(copy, _write_images(str(tmp_path)))
