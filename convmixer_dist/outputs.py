"""Writing outputs safely: every file appears complete or not at all (`atomic_output`: a temporary
name in the same directory, fsync, one rename; removed on any error), and output places are checked
before long work (`ensure_writable_dir` / `ensure_writable_file`: creatable, writable, a path the
file system can hold), so results are never lost at the end of a run.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from typing import Iterator

from convmixer_dist.errors import UsageError


def _limit(path: str, name: str, default: int) -> int:
    """pathconf limit `name` of the nearest existing directory holding `path`."""
    place = os.path.dirname(os.path.abspath(path))
    while place and not os.path.isdir(place) and os.path.dirname(place) != place:
        place = os.path.dirname(place)
    try:
        return os.pathconf(place or "/", name)
    except (OSError, ValueError):
        return default


def check_path_length(path: str, flag: str) -> None:
    """UsageError starting with `flag` if `path` is longer than PATH_MAX or has a component longer
    than NAME_MAX (in bytes), checked before anything is created (os.makedirs would create the
    parents that fit first, then fail)."""
    absolute = os.fsencode(os.path.abspath(path))
    path_max = _limit(path, "PC_PATH_MAX", 4096)
    if len(absolute) >= path_max:
        raise UsageError(f"{flag}: the path is {len(absolute)} bytes long; the file system allows "
                         f"{path_max - 1}; use a shorter path")
    name_max = _limit(path, "PC_NAME_MAX", 255)
    longest = max(absolute.split(b"/"), key=len)
    if len(longest) > name_max:
        raise UsageError(f"{flag}: a name in the path is {len(longest)} bytes long "
                         f"({os.fsdecode(longest[:40])}...); the file system allows {name_max}")


def ensure_writable_dir(directory: str, flag: str) -> None:
    """Create `directory` if needed; a UsageError starting with `flag` ("--name=value") if it cannot
    be created or written. Called before long work, so its results are never lost at the end."""
    check_path_length(directory, flag)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{flag}: {directory} cannot be created ({err.strerror})") from None
    try:  # A real write: access() says yes to root on a read-only directory.
        tempfile.NamedTemporaryFile(dir=directory, prefix=".write_probe_").close()
    except OSError as err:
        raise UsageError(f"{flag}: {directory} is not writable ({err.strerror})") from None


def ensure_writable_file(path: str, flag: str) -> None:
    """UsageError starting with `flag` unless `path` can be written as a file (not a directory, in a
    writable directory, not a read-only file); checked before long work."""
    check_path_length(path, flag)
    if os.path.isdir(path):
        raise UsageError(f"{flag}: {path} is a directory; expected a file name")
    ensure_writable_dir(os.path.dirname(os.path.abspath(path)), flag)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{flag}: {path} is not writable")


def _fsync_directory(directory: str) -> None:
    """Make a rename in `directory` durable (a crash after it keeps the new name)."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # Some file systems refuse to open directories; the rename itself is still atomic.
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    """fsync a file, or every file of a directory tree (an export written into a temporary name)."""
    paths = [path] if not os.path.isdir(path) else [
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
    for name in paths:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """`with atomic_output(PATH) as tmp:` write the file (or a directory) named `tmp`; when the block
    ends without an exception it is fsynced and renamed to PATH in one step, so PATH is either the
    old content or the complete new one, never half a file (a crash, a kill, a full disk). On an
    exception the temporary is removed and the exception propagates.

    `tmp` is a hidden name in PATH's own directory (a rename never crosses file systems), ending in
    `.tmp` and not existing yet: `.NAME.XXXXXX.tmp`; listings of outputs skip it. A directory
    replaces PATH only if PATH is absent or an empty directory (os.replace's rule)."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    os.unlink(tmp)  # Only the unique name is kept: the writer creates a file or a directory there.
    try:
        yield tmp
        if not os.path.lexists(tmp):
            raise FileNotFoundError(errno.ENOENT, "nothing was written", tmp)
        _fsync_tree(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        _remove(tmp)
        if isinstance(err, OSError) and err.filename is None:
            err.filename = path  # A failed write() names no file; the message must name one.
        raise
    _fsync_directory(directory)


def write_bytes(path: str, data: bytes) -> None:
    """Write atomically (see atomic_output): a crash or a full disk never leaves half a file."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    """Write UTF-8 text atomically (see atomic_output)."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, payload: dict) -> None:
    """Atomic, human-readable JSON."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
