"""The model directory: created only once the inputs are known to be valid, with the run's flags.

Layout: flags.txt (resolved flags, a valid flagfile), checkpoints/, train/ and eval/ (TensorBoard
events), plugins/profile/ (profiles), summary.json. A directory that already holds a run is resumed,
but only by a run with the same model and dataset; `--overwrite` moves it aside (never deletes it).
"""
from __future__ import annotations

import json
import os
import time

from convmixer_dist.config import IDENTITY_FIELDS, Config, flag_text, read_flagfile
from convmixer_dist.errors import UsageError

FLAGS_FILE = "flags.txt"


def check_resume_compatible(config: Config) -> None:
    """UsageError listing the identity flags that differ from the run already in MODEL_DIR."""
    path = os.path.join(config.model_dir, FLAGS_FILE)
    if not os.path.isfile(path):
        return
    try:
        previous = read_flagfile(path)
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is unreadable ({err.__class__.__name__}); use --overwrite") from None
    differing = [f"--{name}={flag_text(getattr(config, name))} (was {previous[name]})"
                 for name in IDENTITY_FIELDS
                 if name in previous and previous[name] != flag_text(getattr(config, name))]
    if differing:
        raise UsageError(f"--model_dir={config.model_dir} holds a run with other flags: "
                         f"{', '.join(differing)}; resume with the same flags, pick another "
                         f"--model_dir, or pass --overwrite to move the old run aside")


def move_aside(model_dir: str) -> str | None:
    """Rename an existing non-empty MODEL_DIR to MODEL_DIR.old-TIMESTAMP; returns the new name."""
    if not os.path.isdir(model_dir) or not os.listdir(model_dir):
        return None
    target = f"{model_dir.rstrip(os.sep)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 0
    while os.path.exists(target if not suffix else f"{target}-{suffix}"):
        suffix += 1
    target = target if not suffix else f"{target}-{suffix}"
    os.rename(model_dir, target)
    return target


def prepare_model_dir(config: Config, chief: bool) -> str | None:
    """Check/move aside an existing run, create MODEL_DIR, write flags.txt on the chief.

    Returns where an old run was moved by --overwrite (None otherwise).
    """
    moved = None
    if config.overwrite:
        if chief:
            try:
                moved = move_aside(config.model_dir)
            except OSError as err:
                raise UsageError(f"--overwrite: cannot move {config.model_dir} aside "
                                 f"({err.strerror})") from None
    else:
        check_resume_compatible(config)
    ensure_writable_dir(config.model_dir, f"--model_dir={config.model_dir}")
    if chief:
        write_text(os.path.join(config.model_dir, FLAGS_FILE), config.to_flagfile())
    return moved


def ensure_writable_dir(directory: str, flag: str) -> None:
    """Create `directory` if needed; a UsageError starting with `flag` ("--name=value") if it cannot
    be created or written. Called before long work, so its results are never lost at the end."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{flag}: {directory} cannot be created ({err.strerror})") from None
    if not os.access(directory, os.W_OK):
        raise UsageError(f"{flag}: {directory} is not writable")


def write_text(path: str, text: str) -> None:
    """Write atomically (temp file + rename): a crash never leaves half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, payload: dict) -> None:
    """Atomic, human-readable JSON."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
