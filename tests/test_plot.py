"""plot: reads TF2 tensor scalars and TF1 simple_value scalars from train/eval runs, merges resumed
runs, writes a PNG; a directory without event files is a one-line error with exit code 2."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from convmixer_dist.commands import plot
from convmixer_dist.errors import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_run(directory: str, steps, **series) -> None:
    writer = tf.summary.create_file_writer(directory)
    with writer.as_default():
        for i, step in enumerate(steps):
            for tag, values in series.items():
                tf.summary.scalar(tag, values[i], step=step)
    writer.close()


def _write_simple_value(directory: str, tag: str, step: int, value: float) -> None:
    summary = tf.compat.v1.Summary(value=[tf.compat.v1.Summary.Value(tag=tag, simple_value=value)])
    writer = tf.summary.create_file_writer(directory)
    with writer.as_default():
        tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=step)
    writer.close()


@pytest.fixture
def model_dir(tmp_path):
    root = str(tmp_path / "run1")
    steps = [0, 10, 20, 30]
    _write_run(os.path.join(root, "train"), steps, loss=[2.3, 1.5, 1.1, 0.9],
               accuracy=[0.1, 0.4, 0.6, 0.7], learning_rate=[0.0, 0.01, 0.005, 0.0],
               images_per_sec=[900.0, 1000.0, 1010.0, 990.0])
    _write_run(os.path.join(root, "eval"), [10, 30], loss=[1.6, 1.0], accuracy=[0.38, 0.66])
    _write_simple_value(os.path.join(root, "eval"), "top5_accuracy", 30, 0.95)
    # The test split's run was called eval/ before; a resumed old run adds test/: one series.
    _write_run(os.path.join(root, "test"), [40], loss=[0.9], accuracy=[0.7])
    # A resumed job: a second event file in train/ re-logging step 30 (later write wins) and step 40.
    _write_run(os.path.join(root, "train"), [30, 40], loss=[0.85, 0.8])
    tf.summary.text("notes", "a text summary is not a scalar", step=0)  # no default writer: no-op
    return root


def test_reads_tensor_and_simple_value_scalars_and_merges_resumed_runs(model_dir):
    scalars = plot.read_scalars(model_dir)
    assert set(scalars) == {"train", "test"}
    assert set(scalars["train"]) == {"loss", "accuracy", "learning_rate", "images_per_sec"}
    steps, losses = zip(*scalars["train"]["loss"])
    assert steps == (0, 10, 20, 30, 40)
    np.testing.assert_allclose(losses, [2.3, 1.5, 1.1, 0.85, 0.8], rtol=1e-6)
    assert scalars["test"]["top5_accuracy"] == [(30, pytest.approx(0.95))]
    np.testing.assert_allclose([v for _, v in scalars["test"]["accuracy"]], [0.38, 0.66, 0.7], rtol=1e-6)


def test_writes_a_png_with_a_panel_per_tag(model_dir, tmp_path):
    output = plot.plot_model_dir(model_dir, str(tmp_path / "out" / "curves.png"))
    assert os.path.getsize(output) > 10_000
    with Image.open(output) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width > height > 400  # 5 tags -> a 3x2 grid
    default = plot.plot_model_dir(model_dir)
    assert default == os.path.join(model_dir, "training_curves.png") and os.path.getsize(default) > 0


def test_no_event_files_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no TensorBoard event files"):
        plot.read_scalars(str(tmp_path))
    with pytest.raises(UsageError, match="does not exist"):
        plot.read_scalars(str(tmp_path / "nope"))


def test_command_on_empty_dir_exits_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "convmixer_dist.commands.plot", f"--model_dir={tmp_path}"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: --model_dir={tmp_path}: no TensorBoard event files "
                     "(events.out.tfevents.*) under it; train first or point at the run's directory"]


def test_output_may_be_an_existing_directory_or_a_name_without_extension(model_dir, tmp_path):
    (tmp_path / "figures").mkdir()
    written = plot.plot_model_dir(model_dir, str(tmp_path / "figures"))
    assert written == str(tmp_path / "figures" / "training_curves.png") and os.path.getsize(written) > 0
    bare = plot.plot_model_dir(model_dir, str(tmp_path / "curves"))
    assert bare == str(tmp_path / "curves") and os.path.isfile(bare)  # exactly that name
    assert not os.path.exists(str(tmp_path / "curves.png"))


def test_an_unwritable_output_is_refused_before_reading_the_events(tmp_path):
    # /sys refuses new files even to root; the model directory is not even looked at first.
    with pytest.raises(UsageError, match=r"^--output=/sys/kernel/curves.png: /sys/kernel is not writable"):
        plot.plot_model_dir(str(tmp_path / "no_such_run"), "/sys/kernel/curves.png")


def test_command_with_a_missing_flagfile_exits_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "convmixer_dist.commands.plot", f"--flagfile={tmp_path}/missing"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing" in lines[0], result.stderr
