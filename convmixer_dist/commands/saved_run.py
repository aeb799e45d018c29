"""Reopen a finished (or running) training run: its Config, its model with checkpoint weights, and
the names of its classes. Used by `evaluate` and `export`.

The Config comes from MODEL_DIR/flags.txt, which `main` writes with every resolved field
(`Config.to_flagfile`), so the model is rebuilt exactly as training built it (`model.create_model`)
and the run's own validation (`flags.validate`) applies. Overrides (e.g. a `--data_dir` that moved)
replace single fields before validation.

TensorFlow is imported only inside the functions that need it, so a command can validate its flags
and this run's flags.txt (one-line errors, no TensorFlow start-up noise) before loading it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

from convmixer_dist.config import Config, read_flagfile, settings, value_from_text
from convmixer_dist.data import registry
from convmixer_dist.errors import UsageError
from convmixer_dist.rundir import FLAGS_FILE

def load_run_config(model_dir: str, overrides: Mapping[str, str] | None = None) -> Config:
    """The run's Config from MODEL_DIR/flags.txt (model_dir set to `model_dir`), with `overrides`
    ({flag name: value text}) applied, validated like a training run."""
    from convmixer_dist import flags as cli  # The run's validation; defines the training flags.

    path = os.path.join(model_dir, FLAGS_FILE)
    if not os.path.isdir(model_dir):
        raise UsageError(f"--model_dir={model_dir}: directory does not exist")
    if not os.path.isfile(path):
        raise UsageError(f"--model_dir={model_dir}: no {FLAGS_FILE}; expected the --model_dir of a "
                         "training run (python -m convmixer_dist.main writes it)")
    try:
        values = read_flagfile(path)
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is unreadable ({err.__class__.__name__})") from None
    values.update(overrides or {})
    values["model_dir"] = model_dir
    unknown = sorted(set(values) - {field.name for field in settings()})
    if unknown:
        raise UsageError(f"{path}: unknown flags {unknown} (written by another version?)")
    try:
        config = Config(**{name: value_from_text(name, text) for name, text in values.items()})
    except ValueError as err:
        raise UsageError(f"{path}: {err}") from None
    cli.validate(config)
    return config


def checkpoint_path(model_dir: str, checkpoint: str | None = None) -> str:
    """`checkpoint` (a prefix such as MODEL_DIR/checkpoints/ckpt-500) if given, else the latest one."""
    import tensorflow as tf

    from convmixer_dist import checkpoint as checkpoint_lib

    if checkpoint:
        if not tf.io.gfile.exists(checkpoint + ".index"):
            raise UsageError(f"--checkpoint={checkpoint}: no such checkpoint (expected a prefix like "
                             f"{checkpoint_lib.checkpoint_dir(model_dir)}/ckpt-N, without .index)")
        return checkpoint
    latest = checkpoint_lib.latest_checkpoint(checkpoint_lib.checkpoint_dir(model_dir))
    if not latest:
        raise UsageError(f"--model_dir={model_dir}: no checkpoint in "
                         f"{checkpoint_lib.checkpoint_dir(model_dir)}; train first")
    return latest


def restore_model(config: Config, path: str):
    """The run's model (built by `model.create_model`, float32, no cross-replica BatchNorm) with the
    weights of checkpoint `path`; returns (model, step). Optimizer state in the checkpoint is ignored."""
    import tensorflow as tf

    from convmixer_dist.model import create_model

    model = create_model(dataclasses.replace(config, sync_bn=False))
    step = tf.Variable(0, dtype=tf.int64, trainable=False)
    try:
        status = tf.train.Checkpoint(model=model, step=step).restore(path)
        status.expect_partial().assert_existing_objects_matched()
    except (tf.errors.OpError, AssertionError, ValueError) as err:
        raise UsageError(f"checkpoint {path} does not match the model in flags.txt "
                         f"({err.__class__.__name__}: {str(err).splitlines()[0][:150]})") from None
    return model, int(step.numpy())


def restore_checkpoint(config: Config, checkpoint: str | None = None, rounds: int = 3):
    """(model, step, path): checkpoint `checkpoint` if given, else the newest usable one of the run.
    Like training, a checkpoint that cannot be restored (a data file missing) falls back to the
    previous one with a warning line; when every listed one failed because a running training
    rotated them away meanwhile, the checkpoints are listed again (up to `rounds` times)."""
    import sys

    from convmixer_dist import resume_check

    if checkpoint:
        path = checkpoint_path(config.model_dir, checkpoint)
        return (*restore_model(config, path), path)
    failed: list[tuple[str, UsageError]] = []
    for _ in range(rounds):
        candidates = resume_check.local_checkpoints(config.model_dir)
        for path in candidates:
            try:
                model, step = restore_model(config, path)
            except UsageError as err:
                failed.append((path, err))
                continue
            if failed:
                skipped = ", ".join(sorted({os.path.basename(p) for p, _ in failed}))
                print(f"warning: checkpoint(s) {skipped} could not be restored (rotated away or "
                      f"damaged); using {os.path.basename(path)}", file=sys.stderr, flush=True)
            return model, step, path
        if resume_check.local_checkpoints(config.model_dir) == candidates:
            break  # Nothing rotated meanwhile: listing again would fail the same way.
    if not failed:
        checkpoint_path(config.model_dir)  # Raises: no checkpoint at all.
    raise failed[0][1]


def class_names(config: Config, model_dir: str) -> list[str]:
    """MODEL_DIR/class_names.json if present (image folders), else the dataset's known names."""
    from convmixer_dist.data import image_folder

    saved = image_folder.load_class_names(model_dir)
    if saved is not None:
        if len(saved) != config.num_classes:
            raise UsageError(f"{os.path.join(model_dir, image_folder.CLASS_NAMES_FILE)}: "
                             f"{len(saved)} names for {config.num_classes} classes")
        return saved
    known = registry.describe(config).class_names
    return list(known) if known else [f"class_{i}" for i in range(config.num_classes)]


def normalization(config: Config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) in 0..255 the run's input pipeline normalized with."""
    described = registry.describe(config)
    return described.mean, described.std
