"""Classify image files with an exported model: the top-k classes with names and probabilities.

    python -m convmixer_dist.commands.predict --model=exports/cifar10 [--top_k=5] cat.jpg dog.png ...

--model is the --output directory of `convmixer_dist.commands.export` (its SavedModel and class_names.json);
the model does its own resizing and normalization, so any JPEG/PNG/GIF/BMP of any size works.
Needs only TensorFlow, not the training code.
"""
from __future__ import annotations

import os
import sys
import types
from typing import Sequence, TextIO

from absl import flags

from convmixer_dist import flags as cli
from convmixer_dist.errors import UsageError

SAVED_MODEL_DIR = "saved_model"  # Layout written by convmixer_dist.commands.export.
CLASS_NAMES_FILE = "class_names.json"


def _check_model_dir(model: str) -> tuple[str, str]:
    saved_model = os.path.join(model, SAVED_MODEL_DIR)
    names = os.path.join(model, CLASS_NAMES_FILE)
    if not os.path.isfile(os.path.join(saved_model, "saved_model.pb")) or not os.path.isfile(names):
        raise UsageError(f"--model={model}: expected an export directory with {SAVED_MODEL_DIR}/ and "
                         f"{CLASS_NAMES_FILE} (the --output of python -m convmixer_dist.commands.export)")
    return saved_model, names


def load_classifier(model: str):
    """(loaded SavedModel, class names) of an export directory; `loaded.serve(uint8 [N,H,W,3])` gives
    probabilities. (Keep the loaded object: its variables die with it, even if `serve` is kept.)"""
    import tensorflow as tf

    from convmixer_dist.data import image_folder

    saved_model, names_path = _check_model_dir(model)
    names = image_folder.read_class_names(names_path)
    loaded = tf.saved_model.load(saved_model)
    # The probabilities of a small black image (any size is resized): one per class the model knows.
    classes = int(loaded.serve(tf.zeros([1, 8, 8, 3], tf.uint8)).shape[-1])
    image_folder.read_class_names(names_path, classes)
    return loaded, names


def read_image(path: str):
    """uint8 [1, H, W, 3] tensor of an image file; UsageError naming the file otherwise."""
    import tensorflow as tf

    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such image file")
    try:
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, dtype=tf.uint8,
                                   expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
        raise UsageError(f"{path}: not a decodable JPEG/PNG/GIF/BMP image") from None
    return image[None]


def predict_files(model: str, paths: Sequence[str], top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each image, its top_k (class name, probability) pairs, most likely first."""
    import numpy as np

    loaded, names = load_classifier(model)
    results = []
    for path in paths:
        probabilities = np.asarray(loaded.serve(read_image(path)))[0]
        order = np.argsort(-probabilities, kind="stable")[:top_k]
        results.append([(names[i], float(probabilities[i])) for i in order])
    return results


def print_predictions(paths: Sequence[str], results, out: TextIO = sys.stdout) -> None:
    for path, top in zip(paths, results):
        print(path, file=out)
        width = max(len(name) for name, _ in top)
        for rank, (name, probability) in enumerate(top, 1):
            print(f"  {rank}. {name:<{width}}  {probability:.4f}", file=out)
    out.flush()


# ---------------------------------------------------------------------------------------- command
def define_flags() -> None:
    flags.DEFINE_string("model", None, "Export directory (the --output of convmixer_dist.commands.export).")
    flags.DEFINE_integer("top_k", 5, "Classes to print per image.")


def main(paths: list[str], opts: types.SimpleNamespace) -> None:
    model, top_k = opts.model, opts.top_k
    if not model:
        raise UsageError("--model is required: the export directory (convmixer_dist.commands.export --output)")
    if not paths:
        raise UsageError("no images: usage: python -m convmixer_dist.commands.predict --model=DIR IMAGE...")
    if top_k < 1:
        raise UsageError(f"--top_k={top_k}: expected a positive number of classes")
    _check_model_dir(model)
    for path in paths:  # Fail on a typo before loading the model.
        if not os.path.isfile(path):
            raise UsageError(f"{path}: no such image file")
    from convmixer_dist.runtime import quiet_tensorflow_import

    quiet_tensorflow_import()
    print_predictions(paths, predict_files(model, paths, top_k))


if __name__ == "__main__":
    cli.run_command(main, define_flags)
