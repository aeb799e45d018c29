"""User-facing errors: one clear line, exit code 2, no traceback.

Anything a user can get wrong (a flag, a file, an environment variable) is reported by raising
`UsageError` at the boundary; every command's entry point (`flags.run_command`) turns it into
`error: <message>` on stderr and exit code 2. Internal bugs still raise normally.
"""
from __future__ import annotations

import os
import sys

USAGE_EXIT_CODE = 2


class UsageError(Exception):
    """A mistake in user input; the message is one line naming the flag/file and what is expected."""


def report_and_exit(err: UsageError) -> None:
    """Print `error: ...` as a single line on stderr and exit with code 2."""
    message = " ".join(str(err).split())  # Guarantee a single line.
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT_CODE)


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
