"""User-facing errors: one clear line, exit code 2, no traceback.

Anything a user can get wrong (a flag, a file, an environment variable) is reported by raising
`UsageError` at the boundary; every command's entry point (`flags.run_command`) turns it into
`error: <message>` on stderr and exit code 2. What the environment gets wrong is mapped there by
kind (`environment_error`): file-system errors (no space, permissions, read-only, link loops, names
too long, ...), text that is not UTF-8, and TensorFlow's errors for missing, unreadable or truncated
files become one line naming the path and what to do. A full disk exits with `DISK_FULL_EXIT_CODE`
(74), Ctrl-C with 130. Anything else (TypeError, AssertionError, a ValueError of our own code, ...)
is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
import os
import re
import sys

USAGE_EXIT_CODE = 2
DISK_FULL_EXIT_CODE = 74  # EX_IOERR: nothing half-written is left; free space and rerun to resume.
INTERRUPTED_EXIT_CODE = 130  # Ctrl-C (128 + SIGINT), as a shell reports it.
BROKEN_PIPE_EXIT_CODE = 141  # The output's reader left (128 + SIGPIPE), as for `yes | head`.

# What to do about each file-system error a user's environment causes (errno -> advice).
_OS_ADVICE = {
    errno.ENOSPC: "no space left on the device; free space there (or write elsewhere) and rerun",
    errno.EDQUOT: "disk quota exceeded; free space there (or write elsewhere) and rerun",
    errno.EFBIG: "file too large for that file system; write elsewhere",
    errno.EACCES: "permission denied; fix its permissions or pick another path",
    errno.EPERM: "operation not permitted; fix its permissions or pick another path",
    errno.EROFS: "read-only file system; pick a writable place",
    errno.ELOOP: "too many levels of symbolic links (a link loop); fix or remove the link",
    errno.ENAMETOOLONG: "file name too long; use a shorter path",
    errno.EISDIR: "is a directory; expected a file",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.ENOENT: "no such file or directory (a link that points nowhere?)",
    errno.EMLINK: "too many links or entries in a directory; use another directory",
    errno.ENXIO: "not a regular file (a FIFO or device without a peer); expected a regular file",
    errno.ENODEV: "not a regular file (a device); expected a regular file",
    errno.ETXTBSY: "the file is busy (being executed); use another path",
    errno.EBUSY: "the file or device is busy; retry later or use another path",
    errno.EEXIST: "already exists; remove it or pick another path",
    errno.ENOTEMPTY: "the directory is not empty; remove its contents or pick another path",
    errno.EXDEV: "cannot move across file systems; keep it on one file system",
    errno.EIO: "input/output error (the disk or network file system failed); check the device",
    errno.EMFILE: "too many open files; raise `ulimit -n`",
    errno.ENFILE: "too many open files on the system; retry later",
    errno.ESTALE: "stale network file handle; remount the file system and rerun",
}
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# TensorFlow's errors (by class name; TensorFlow need not be imported) that mean a file is missing,
# unreadable or damaged, and a full disk; their first line names the file.
_TF_ADVICE = {
    "NotFoundError": "not found; check the path",
    "PermissionDeniedError": "permission denied; fix its permissions or pick another path",
    "DataLossError": "the file is truncated or corrupted; restore or regenerate it",
}
_TF_UNICODE = "Error converting unicode string"  # TensorFlow's ValueError for a path that is not UTF-8
_NO_SPACE = re.compile(r"no space left|disk quota exceeded", re.I)


class UsageError(Exception):
    """A mistake in user input; the message is one line naming the flag/file and what is expected."""


class DiskFull(Exception):
    """The disk filled up while writing; the message names what was cleaned up and what is intact
    (the last complete checkpoint). Reported in one line with exit code 74."""


def one_line(text: str, limit: int = 400) -> str:
    """`text` as one line of at most `limit` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _tf_error_kind(exc: BaseException) -> str | None:
    """The class name of a TensorFlow OpError (ResourceExhaustedError, ...), else None."""
    for klass in type(exc).__mro__:
        if klass.__name__ == "OpError" and klass.__module__.startswith("tensorflow"):
            return type(exc).__name__
    return None


def _tf_message(exc: BaseException) -> str:
    """TensorFlow's message without its `{{function_node ...}}` and `[Op:...]` decorations."""
    text = getattr(exc, "message", None) or str(exc)
    text = re.sub(r"\{\{[^}]*\}\}", "", text.splitlines()[0] if text.strip() else text)
    return one_line(re.sub(r"\s*\[Op:[^\]]*\]", "", text)).strip() or type(exc).__name__


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the disk (or quota) is full: OSError ENOSPC/EDQUOT or TensorFlow's
    ResourceExhaustedError "No space left on device"."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    return _tf_error_kind(exc) is not None and bool(_NO_SPACE.search(str(exc)))


def _os_message(exc: OSError) -> str:
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    where = " -> ".join(os.fsdecode(p) if isinstance(p, bytes) else str(p) for p in paths)
    return f"{where or '(a file the system did not name)'}: {_OS_ADVICE[exc.errno]}"


def _unicode_message(exc: UnicodeError) -> str:
    raw = getattr(exc, "object", b"")
    start = getattr(exc, "start", 0)
    snippet = raw[max(0, start - 20):start + 20] if isinstance(raw, (bytes, str)) else ""
    return (f"text that is not valid {exc.encoding} ({exc.reason} near {snippet!r}) in a file, "
            "a file or directory name, or an argument; rename the file or re-encode the text as UTF-8")


def environment_error(exc: BaseException) -> str | None:
    """The one-line message for an error caused by the user's input or environment, else None
    (a bug: the caller re-raises it with its traceback). Maps kinds, not everything: OSErrors with
    the errnos above, text encoding errors, and TensorFlow's NotFound / PermissionDenied / DataLoss
    errors and its "No space left" ResourceExhaustedError."""
    if isinstance(exc, DiskFull):
        return one_line(str(exc))
    if isinstance(exc, OSError) and exc.errno in _OS_ADVICE:
        return one_line(_os_message(exc))
    if isinstance(exc, (UnicodeDecodeError, UnicodeEncodeError)):
        return one_line(_unicode_message(exc))
    if isinstance(exc, ValueError) and str(exc).startswith(_TF_UNICODE):  # a name TensorFlow cannot take
        return one_line("a file or directory name is not valid UTF-8, which TensorFlow cannot open; "
                        "rename it (or the folder holding it) to a UTF-8 name")
    kind = _tf_error_kind(exc)
    if kind == "ResourceExhaustedError" and is_disk_full(exc):
        return one_line(f"{_tf_message(exc)}: free space there (or write elsewhere) and rerun")
    if kind in _TF_ADVICE:
        return one_line(f"{_tf_message(exc)}: {_TF_ADVICE[kind]}")
    return None


def exit_code_for(exc: BaseException) -> int:
    """The exit code of an error `environment_error` maps: 74 for a full disk, else 2."""
    return DISK_FULL_EXIT_CODE if isinstance(exc, DiskFull) or is_disk_full(exc) else USAGE_EXIT_CODE


def report_environment_error(exc: BaseException, message: str) -> None:
    """Print `error: <message>` in one line and exit with the code of its kind."""
    print(f"error: {one_line(message, 1000)}", file=sys.stderr, flush=True)
    sys.exit(exit_code_for(exc))


def exit_on_broken_pipe() -> None:
    """The reader of stdout went away (`| head`): exit 141 (128 + SIGPIPE, what a shell reports for
    a tool killed by SIGPIPE) without a message or the interpreter's flush error at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    sys.exit(BROKEN_PIPE_EXIT_CODE)


def report_interrupt() -> None:
    """Ctrl-C outside a training run's own handling: one line, exit code 130."""
    print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
    sys.exit(INTERRUPTED_EXIT_CODE)


class UsageError(Exception):
    """A mistake in user input; the message is one line naming the flag/file and what is expected."""


def report_and_exit(err: UsageError) -> None:
    """Print `error: ...` as a single line on stderr and exit with code 2."""
    print(f"error: {one_line(str(err), sys.maxsize)}", file=sys.stderr, flush=True)  # a single line
    sys.exit(USAGE_EXIT_CODE)


def _flagfile_target(arg: str, following: list[str]) -> str | None:
    """The file of a `--flagfile=F` / `-flagfile=F` / `--flagfile F` argument, else None."""
    for prefix in ("--flagfile=", "-flagfile="):
        if arg.startswith(prefix):
            return arg[len(prefix):]
    if arg in ("--flagfile", "-flagfile") and following:
        return following[0]
    return None


def _read_flagfile(target: str, path: str) -> list[str]:
    """The lines of flagfile `path` (given as `target`); UsageError if it is not a readable regular
    file of UTF-8 text (a FIFO would block absl's reader forever, other bytes fail deep inside it)."""
    import stat

    flag = f"--flagfile={target}"
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise UsageError(f"{flag}: {_OS_ADVICE.get(err.errno, err.strerror)}") from None
    if not stat.S_ISREG(mode):
        raise UsageError(f"{flag}: not a regular file (a directory, FIFO or device); expected a "
                         "text file of --name=value lines")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise UsageError(f"{flag}: {_OS_ADVICE.get(err.errno, err.strerror)}") from None
    try:
        return raw.decode("utf-8").split("\n")  # as absl splits them (not at \x0c, \x1c, ...)
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise UsageError(f"{flag} line {line}: not UTF-8 text (byte {raw[err.start]:#04x}); save the "
                         "file as UTF-8") from None


def check_arguments_are_utf8(args: list[str]) -> None:
    """UsageError for a command-line argument that is not valid UTF-8 (Python hands such bytes over
    surrogate-escaped; TensorFlow cannot open a path spelled so, deep inside a run)."""
    for arg in args:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            bad = os.fsencode(arg).decode("utf-8", "backslashreplace")  # the odd bytes as \xNN
            raise UsageError(f"argument {bad[:200]} is not valid UTF-8 (a name in another encoding?); "
                             "TensorFlow cannot open such paths: rename it to a UTF-8 name") from None


def check_flagfiles(args: list[str], stack: tuple[str, ...] = ()) -> None:
    """UsageError for what absl would silently get wrong in flagfiles: a file that includes itself
    (directly or through others; absl warns and drops it, so a recipe's flags are silently lost),
    and a line that is not a flag (`learning_rate=0.5` without `--` would be ignored)."""
    for i, arg in enumerate(args):
        target = _flagfile_target(arg, args[i + 1:])
        if target is None or not target:
            continue
        path = os.path.realpath(os.path.expanduser(target))
        if path in stack:
            chain = " -> ".join([*stack[stack.index(path):], path])
            raise UsageError(f"--flagfile={target}: circular flagfile includes ({chain}); "
                             "remove the --flagfile line that closes the loop")
        lines = _read_flagfile(target, path)
        nested = []
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if not text or text.startswith(("#", "//")):
                continue
            if not text.startswith("-"):
                raise UsageError(f"--flagfile={target} line {number}: {text!r} is not a flag; "
                                 "expected --name=value")
            nested.append(text)
        check_flagfiles(nested, (*stack, path))
