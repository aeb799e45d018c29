"""User-facing errors: one clear line, exit code 2, no traceback.

Anything a user can get wrong (a flag, a file, an environment variable) is reported by raising
`UsageError` at the boundary; entry points wrap their body in `exit_on_usage_error` so the user sees
`error: <message>` on stderr and the process exits with code 2. Internal bugs still raise normally.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

USAGE_EXIT_CODE = 2

F = TypeVar("F", bound=Callable)


class UsageError(Exception):
    """A mistake in user input; the message is one line naming the flag/file and what is expected."""


def report_and_exit(err: UsageError) -> None:
    """Print `error: ...` as a single line on stderr and exit with code 2."""
    message = " ".join(str(err).split())  # Guarantee a single line.
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT_CODE)


def exit_on_usage_error(fn: F) -> F:
    """Decorator for entry points: turn `UsageError` into one stderr line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UsageError as err:
            report_and_exit(err)

    return wrapper  # type: ignore[return-value]


def _flagfile_target(arg: str, following: list[str]) -> str | None:
    """The file of a `--flagfile=F` / `-flagfile=F` / `--flagfile F` argument, else None."""
    for prefix in ("--flagfile=", "-flagfile="):
        if arg.startswith(prefix):
            return arg[len(prefix):]
    if arg in ("--flagfile", "-flagfile") and following:
        return following[0]
    return None


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
        try:
            with open(path) as f:
                lines = f.readlines()
        except (OSError, UnicodeDecodeError):
            continue  # absl reports an unreadable flagfile in its own one line.
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


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing for `app.run(..., flags_parser=parse_flags)` whose errors (unknown flag or
    value, missing or circular flagfile, a flagfile line that is not a flag) are one line with exit
    code 2 instead of absl's two lines and code 1 (or a warning and silently different flags)."""
    from absl import flags

    try:
        check_flagfiles(argv[1:])
        return flags.FLAGS(argv)
    except flags.Error as err:
        report_and_exit(UsageError(str(err)))
    except UsageError as err:
        report_and_exit(err)
