"""User-facing errors: one clear line, exit code 2, no traceback.

Anything a user can get wrong (a flag, a file, an environment variable) is reported by raising
`UsageError` at the boundary; every command's entry point (`flags.run_command`) turns it into
`error: <message>` on stderr and exit code 2. Internal bugs still raise normally.
"""
from __future__ import annotations

import sys

USAGE_EXIT_CODE = 2


class UsageError(Exception):
    """A mistake in user input; the message is one line naming the flag/file and what is expected."""


def report_and_exit(err: UsageError) -> None:
    """Print `error: ...` as a single line on stderr and exit with code 2."""
    message = " ".join(str(err).split())  # Guarantee a single line.
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT_CODE)
