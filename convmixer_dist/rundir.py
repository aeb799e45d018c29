"""The model directory: created only once the inputs are known to be valid, with the run's flags.

Layout: flags.txt (resolved flags, a valid flagfile), checkpoints/, train/ and eval/ (TensorBoard
events), plugins/profile/ (profiles), summary.json.
"""
from __future__ import annotations

import json
import os

from convmixer_dist.config import Config
from convmixer_dist.errors import UsageError


def prepare_model_dir(config: Config, chief: bool) -> None:
    """Create MODEL_DIR (one-line error when impossible) and, on the chief, write flags.txt."""
    try:
        os.makedirs(config.model_dir, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--model_dir={config.model_dir} cannot be created ({err.strerror})") from None
    if not os.access(config.model_dir, os.W_OK):
        raise UsageError(f"--model_dir={config.model_dir} is not writable")
    if chief:
        write_text(os.path.join(config.model_dir, "flags.txt"), config.to_flagfile())


def write_text(path: str, text: str) -> None:
    """Write atomically (temp file + rename): a crash never leaves half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, payload: dict) -> None:
    """Atomic, human-readable JSON."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
