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


@contextlib.contextmanager
def _native_stderr_silenced():
    """Point file descriptor 2 at /dev/null for the duration (Python's sys.stderr is untouched)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quiet_tensorflow_import() -> None:
    """Import TensorFlow (and Keras) with native import-time logs suppressed; idempotent."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules:
        return
    try:
        with _native_stderr_silenced():
            import tensorflow  # noqa: F401
            import keras  # noqa: F401
    except ImportError:
        # Import again with stderr visible so the real reason reaches the user.
        import tensorflow  # noqa: F401
