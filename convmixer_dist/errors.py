"""User-facing errors: one clear line, exit code 2, no traceback.

Anything a user can get wrong (a flag, a file, an environment variable) is reported by raising
`UsageError` at the boundary; entry points wrap their body in `exit_on_usage_error` so the user sees
`error: <message>` on stderr and the process exits with code 2. Internal bugs still raise normally.
"""
from __future__ import annotations

import functools
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


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing for `app.run(..., flags_parser=parse_flags)` whose errors (unknown flag or
    value, missing flagfile) are one line with exit code 2 instead of absl's two lines and code 1."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        report_and_exit(UsageError(str(err)))
