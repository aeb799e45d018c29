"""Importing TensorFlow without its native start-up chatter.

TensorFlow's C++ runtime prints INFO lines at import time *before* its logging is initialised, so
TF_CPP_MIN_LOG_LEVEL cannot silence them, and a CUDA build on a machine without a driver logs a
"failed call to cuInit" error at the first device query. Command-line tools promise that a user
mistake prints exactly one line, so they import TensorFlow through `quiet_tensorflow_import` first.
Set TF_CPP_MIN_LOG_LEVEL yourself (e.g. 0) to see TensorFlow's native logs again.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[list[str]]:
    """Hold back what native (C++) code writes to file descriptor 2 for the duration; the non-empty
    lines are yielded (filled in on exit) for error messages. Python's sys.stderr is untouched."""
    lines: list[str] = []
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(line.strip() for line in sink if line.strip())


def quiet_tensorflow_import() -> None:
    """Import TensorFlow (and Keras) with native import-time logs suppressed; idempotent."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules:
        return
    try:
        with native_stderr_captured():
            import tensorflow  # noqa: F401
            import keras  # noqa: F401
    except ImportError:
        # Import again with stderr visible so the real reason reaches the user.
        import tensorflow  # noqa: F401
