"""Whether a run in MODEL_DIR may be resumed with the given flags, decided before anything is written.

Three kinds of settings, checked in this order against what the run recorded:
- the run's identity (`config.IDENTITY_FIELDS`: the model's shape, the dataset, and the settings that
  define the data split and stream: --validation_fraction, --seed, --global_batch_size) may never
  change: checkpoints/identity.json (written once), else flags.txt for settings an older
  identity.json lacks; one line naming each changed flag;
- the checkpoint's layout: the variable names and shapes of the newest readable checkpoint
  (`tf.train` reader) against those this model and optimizer would save; a difference is one line
  naming the flags that changed since the run was written (e.g. --dropout_rate 0 -> 0.1 adds
  the dropout layers' random-number state);
- the schedule (`SCHEDULE_FIELDS`: --epochs, --train_steps, --learning_rate, --lr_schedule,
  --warmup_steps) may change: the learning-rate schedule is recomputed for the new values and
  continues from the restored step; each change is stated in one line of the run's log.
Everything else (augmentation, logging, checkpoint period, ...) may change silently.
"""
from __future__ import annotations

import json
import os

import tensorflow as tf

from convmixer_dist import checkpoint as checkpoint_lib
from convmixer_dist import rundir
from convmixer_dist.config import IDENTITY_FIELDS, Config, flag_text, read_flagfile, settings
from convmixer_dist.errors import UsageError

SCHEDULE_FIELDS = ("epochs", "train_steps", "learning_rate", "lr_schedule", "warmup_steps")
# Keys that are no part of the layout: the object graph, and the save counter (created by save()).
_NOT_LAYOUT = ("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter/")


def previous_flags(model_dir: str) -> dict[str, str]:
    """MODEL_DIR/flags.txt as {name: value text} ({} if there is none or it is unreadable)."""
    try:
        return read_flagfile(os.path.join(model_dir, rundir.FLAGS_FILE))
    except (OSError, UnicodeDecodeError):
        return {}


def changed_flags(config: Config, previous: dict[str, str], names) -> list[str]:
    """"--name=new (was old)" for each of `names` whose value differs from `previous`."""
    return [f"--{name}={flag_text(getattr(config, name))} (was {previous[name]})" for name in names
            if name in previous and previous[name] != flag_text(getattr(config, name))]


def check_identity(config: Config) -> None:
    """The recorded identity (rundir), then identity settings an older identity.json lacks against
    flags.txt; UsageError naming the changed flags."""
    rundir.check_resume_compatible(config)
    try:
        with open(os.path.join(config.model_dir, rundir.IDENTITY_FILE)) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        recorded = {}  # None yet (rundir has refused an unreadable one).
    recorded = recorded if isinstance(recorded, dict) else {}
    missing = [name for name in IDENTITY_FIELDS if name not in recorded]
    changed = changed_flags(config, previous_flags(config.model_dir), missing)
    if changed:
        raise UsageError(f"--model_dir={config.model_dir} holds a run with other flags (flags.txt): "
                         f"{', '.join(changed)}; these define the run (model, data split and stream), "
                         "resume with the same flags, or fork the run into another --model_dir")


def local_checkpoints(model_dir: str) -> list[str]:
    """The run's checkpoints in MODEL_DIR/checkpoints, newest first (the index's entries as files of
    this directory: in a copied run they may name the original's place)."""
    directory = checkpoint_lib.checkpoint_dir(model_dir)
    listed = [os.path.join(directory, os.path.basename(p))
              for p in reversed(checkpoint_lib.read_index(directory) or [])]
    found = [p for p in listed if tf.io.gfile.exists(p + ".index")]
    return found + [p for p in checkpoint_lib.checkpoints_on_disk(directory) if p not in found]


def saved_variables(prefix: str) -> dict[str, tuple]:
    """{checkpoint key: shape} of a checkpoint (raises tf.errors.OpError if it cannot be read)."""
    shapes = tf.compat.v1.train.NewCheckpointReader(prefix).get_variable_to_shape_map()
    return {key: tuple(shape) for key, shape in shapes.items() if not key.startswith(_NOT_LAYOUT)}


def expected_variables(checkpoint: tf.train.Checkpoint) -> dict[str, tuple]:
    """{checkpoint key: shape} that `checkpoint` would save: written to TensorFlow's in-memory file
    system (never to disk) and read back."""
    prefix = f"ram://resume_check_{os.getpid()}_{id(checkpoint)}/ckpt"
    try:
        return saved_variables(checkpoint.write(prefix))
    finally:
        tf.io.gfile.rmtree(os.path.dirname(prefix))


def layout_difference(expected: dict[str, tuple], saved: dict[str, tuple]) -> str | None:
    """The difference between two {key: shape} maps in words, None when they agree."""
    def short(keys):
        keys = sorted(k.replace("/.ATTRIBUTES/VARIABLE_VALUE", "") for k in keys)
        return ", ".join(keys[:2]) + (f" (+{len(keys) - 2} more)" if len(keys) > 2 else "")

    parts = []
    if set(saved) - set(expected):
        parts.append(f"only in the checkpoint: {short(set(saved) - set(expected))}")
    if set(expected) - set(saved):
        parts.append(f"only in this model: {short(set(expected) - set(saved))}")
    reshaped = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
    if reshaped:
        key = reshaped[0]
        parts.append(f"{len(reshaped)} shapes differ, e.g. {short([key])} {list(saved[key])} in the "
                     f"checkpoint, {list(expected[key])} here")
    return "; ".join(parts) or None


def check_checkpoint_layout(config: Config, checkpoint: tf.train.Checkpoint) -> None:
    """UsageError when the newest readable checkpoint of MODEL_DIR holds other variables than this
    model and optimizer (damaged checkpoints are left to the restore's fall-back)."""
    for prefix in local_checkpoints(config.model_dir):
        try:
            saved = saved_variables(prefix)
        except (tf.errors.OpError, ValueError):
            continue
        difference = layout_difference(expected_variables(checkpoint), saved)
        if difference is None:
            return
        previous = previous_flags(config.model_dir)
        names = [f.name for f in settings() if f.name not in ("model_dir", "overwrite")]
        changed = changed_flags(config, previous, names)
        cause = (f"flags changed since the run was written: {', '.join(changed)}" if changed
                 else "flags.txt names no changed flag")
        raise UsageError(f"--model_dir={config.model_dir}: {os.path.basename(prefix)} was saved by another "
                         f"model layout ({cause}; {difference}); resume with the run's flags, or start a "
                         "new run in another --model_dir")


def check_resume(config: Config, checkpoint: tf.train.Checkpoint) -> list[str]:
    """All checks of a resume (nothing without a run in MODEL_DIR, or with --overwrite); returns the
    lines stating the schedule changes that will be applied."""
    if config.overwrite or not os.path.isdir(config.model_dir):
        return []
    check_identity(config)
    check_checkpoint_layout(config, checkpoint)
    if not local_checkpoints(config.model_dir):
        return []
    return [f"resuming with a changed schedule: {change}; the learning-rate schedule is recomputed "
            "for the new value and continues from the restored step"
            for change in changed_flags(config, previous_flags(config.model_dir), SCHEDULE_FIELDS)]
