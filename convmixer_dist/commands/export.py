"""Export a training run's checkpoint as a self-contained classifier: uint8 images in, probabilities out.

    python -m convmixer_dist.commands.export --model_dir=runs/cifar10 --output=exports/cifar10 [--checkpoint=PREFIX]
        [training flags overriding the run's, e.g. --eval_crop_fraction=0.96, as for evaluate]

OUTPUT/ (a new directory: an export never replaces one; written beside it and renamed when complete)
  saved_model/       TensorFlow SavedModel, signature `serving_default` (endpoint `serve`):
                     uint8 [N, H, W, 3] (any N, H, W) -> float32 [N, num_classes] probabilities
  model.keras        the same Keras model (keras.models.load_model)
  class_names.json   index -> class name
  export.json        image size, normalization, source checkpoint and step

Preprocessing is inside the model and is the run's evaluation transform, so the export reproduces
the checkpoint's predictions on what `evaluate` feeds it:
- image-file runs (`--dataset=image_folder|tfrecord`): timm's crop_pct transform, the evaluation
  pipeline's own function (`serving.EvalCenterCrop`: shorter side to image_size / eval_crop_fraction,
  bicubic, central image_size square);
- array datasets (CIFAR, synthetic), whose evaluation images already have the training size: an
  image of another size is centre-cropped to a square and resized (bilinear) with
  keras.layers.Resizing, the identity at the training size.
Then keras.layers.Normalization applies the training pipeline's per-channel mean/std (0..255
scale), and the ConvMixer's logits go through a float32 softmax. Reloading model.keras needs
`convmixer_dist` importable (its layers are registered on import of `convmixer_dist.serving` and
`convmixer_dist.fused`).
"""
from __future__ import annotations

import errno
import os
import sys
import types
from typing import TextIO

from absl import flags

from convmixer_dist import flags as cli
from convmixer_dist.commands import saved_run
from convmixer_dist.config import Config
from convmixer_dist.errors import UsageError

SAVED_MODEL_DIR = "saved_model"
KERAS_FILE = "model.keras"
INFO_FILE = "export.json"


def build_serving_model(model, image_size: int, mean, std, name: str = "convmixer_classifier",
                        eval_crop_fraction: float | None = None):
    """uint8 images of any size -> crop/resize -> normalize -> `model` -> float32 softmax.

    `eval_crop_fraction` set: the image-file evaluation transform (`serving.EvalCenterCrop`); None:
    centre square, bilinear resize (array datasets)."""
    import keras
    import numpy as np

    from convmixer_dist import serving

    inputs = keras.Input((None, None, 3), dtype="uint8", name="images")
    if eval_crop_fraction is None:
        x = keras.layers.Resizing(image_size, image_size, interpolation="bilinear", crop_to_aspect_ratio=True,
                                  dtype="float32", name="resize")(inputs)
    else:
        x = serving.EvalCenterCrop(image_size, eval_crop_fraction, dtype="float32", name="resize")(inputs)
    x = keras.layers.Normalization(mean=list(mean), variance=list(np.square(std)), dtype="float32",
                                   name="normalize")(x)
    # training=False is pinned here: keras.layers.Resizing's call defaults to training=True, which Keras
    # propagates to later layers, so an unpinned call would run BatchNorm on batch statistics.
    logits = model(x, training=False)
    probabilities = keras.layers.Softmax(dtype="float32", name="probabilities")(logits)
    return keras.Model(inputs, probabilities, name=name)


def _check_output(output: str) -> None:
    """An export never replaces anything: OUTPUT must not exist yet (or be an empty directory)."""
    if os.path.isfile(output) or os.path.islink(output):
        raise UsageError(f"--output={output} is a file; expected a directory for the export")
    if os.path.isdir(output) and os.listdir(output):
        what = ("holds an earlier export" if os.path.isfile(os.path.join(output, INFO_FILE))
                else "is not an earlier export")
        raise UsageError(f"--output={output} exists and {what}; an export never replaces a directory: "
                         "pick a new one or remove it first")


def _info(config: Config, path: str, step: int, mean, std, image_files: bool) -> dict:
    """export.json: what the export is and what it expects."""
    return {"checkpoint": path, "step": step, "model": config.model, "dataset": config.dataset,
            "num_classes": config.num_classes, "image_size": config.image_size,
            "mean": list(mean), "std": list(std),
            "input": "uint8 [N, H, W, 3], any N/H/W " + (
                f"(shorter side resized to image_size / {config.eval_crop_fraction:g} bicubic, central "
                "image_size crop: the evaluation transform)" if image_files
                else "(centre-cropped to square, resized to image_size, bilinear)"),
            "output": "float32 [N, num_classes] class probabilities"}


def export_run(config: Config, output: str, checkpoint: str | None = None,
               out: TextIO = sys.stdout) -> dict:
    """Restore the run's checkpoint and write the export described in the module docstring;
    returns the contents of export.json."""
    from convmixer_dist import rundir
    from convmixer_dist.data import image_folder, registry

    _check_output(output)
    model, step, path = saved_run.restore_checkpoint(config, checkpoint)  # Falls back as training does.
    names = saved_run.class_names(config, config.model_dir)
    mean, std = saved_run.normalization(config)
    image_files = registry.describe(config).encoded  # evaluated through image_decode.center_crop
    classifier = build_serving_model(model, config.image_size, mean, std,
                                     eval_crop_fraction=config.eval_crop_fraction if image_files else None)
    info = _info(config, path, step, mean, std, image_files)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    try:  # Written beside OUTPUT and renamed into place when complete: never half an export.
        with rundir.atomic_output(output) as tmp:
            os.makedirs(tmp)
            classifier.save(os.path.join(tmp, KERAS_FILE))
            classifier.export(os.path.join(tmp, SAVED_MODEL_DIR), format="tf_saved_model", verbose=False)
            image_folder.save_class_names(tmp, names)
            rundir.write_json(os.path.join(tmp, INFO_FILE), info)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        raise UsageError(f"--output={output} was created by someone else meanwhile; an export never "
                         "replaces one") from None
    print(f"exported {path} (step {step}) to {output}: {SAVED_MODEL_DIR}/, {KERAS_FILE}, "
          f"{image_folder.CLASS_NAMES_FILE}, {INFO_FILE}", file=out, flush=True)
    return info


# ---------------------------------------------------------------------------------------- command
def define_flags() -> None:
    """--output and --checkpoint; --model_dir is the training flag."""
    flags.DEFINE_string("output", None, "Directory to write the export to.")
    flags.DEFINE_string("checkpoint", None, "Checkpoint prefix (MODEL_DIR/checkpoints/ckpt-N); "
                        "default: the latest.")
    flags.declare_key_flag("model_dir")


def main(args: list[str], opts: types.SimpleNamespace) -> None:
    if args:
        raise UsageError(f"unexpected arguments {args}; usage: --model_dir=DIR --output=DIR")
    overrides = dict(opts.overrides)
    if "model_dir" not in overrides:
        raise UsageError("--model_dir is required: the directory of the training run to export")
    if not opts.output:
        raise UsageError("--output is required: the directory to write the exported model to")
    _check_output(opts.output)
    # Training flags given here override the run's, as for evaluate (e.g. --eval_crop_fraction).
    config = saved_run.load_run_config(overrides.pop("model_dir"), overrides)
    from convmixer_dist.runtime import quiet_tensorflow_import

    quiet_tensorflow_import()
    export_run(config, opts.output, opts.checkpoint)


if __name__ == "__main__":
    cli.run_command(main, define_flags, training=True)
