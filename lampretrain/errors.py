"""The one error type for mistakes a user can fix.

Recipe keys, CLI arguments, store paths, checkpoints and dataset names are
checked where they are first known (before a model or a process group is
built where that is possible) and a failure raises a :class:`UserError`
subclass whose message is one line naming the key or file and the fix. The
CLI prints that line and exits with :data:`EXIT_USAGE`; ``--debug`` shows
the traceback as well.
"""

from __future__ import annotations

EXIT_USAGE = 2  # argparse's code for a bad command line; every user mistake exits with it


class UserError(Exception):
    """A mistake the user can fix; ``str(err)`` is one line naming the key/file and the fix."""


def one_line(message: str) -> str:
    """``message`` folded onto one line (wrapped library messages carry newlines)."""
    return " ".join(message.split())
