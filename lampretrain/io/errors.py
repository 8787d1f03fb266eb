"""Errors raised by the readers, and the one rule for reporting them.

A reader reports a record it cannot turn into a :class:`~lampretrain.frames.Frame` through
:func:`report`: with ``on_error=None`` the error is raised, otherwise the callback gets it and
the reader carries on with the next record (or stops, when the file itself is damaged).

Data a reader leaves out of otherwise good frames (a label-like key no mapping names, a label
that cannot be used) goes down the same channel as a :class:`ReadWarning` through :func:`warn`:
the callback gets it, and tells it from an error by type; with ``on_error=None`` it becomes a
Python warning, since the frames themselves are fine.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from lampretrain.frames import FrameError


def source_id(path: object, index: object = None) -> str:
    """The stable id of one record: ``<path>#<index>`` (index may be a group path)."""
    return f"{path}#{index}" if index is not None else str(path)


class ReadError(FrameError):
    """A record (or the rest of a file) that could not be read; names file, record and field."""

    def __init__(self, message: str, path: object, index: object = None, field: str | None = None):
        self.path = str(path)
        self.index = index
        super().__init__(message, field=field, source=source_id(path, index))


class ReadWarning(ReadError, UserWarning):
    """Something in a file that the frames read from it do not carry; names file, key(s) and the fix."""

    def __init__(self, message: str, path: object, index: object = None, field: str | None = None, keys=()):
        self.keys = list(keys)  # the source's names the warning is about, for report.json
        super().__init__(message, path, index, field)


ErrorHandler = Callable[[ReadError], None] | None


def report(on_error: ErrorHandler, error: ReadError) -> None:
    """Raise ``error`` when there is no handler, else hand it over and return."""
    if on_error is None:
        raise error
    on_error(error)


def warn(on_error: ErrorHandler, warning: ReadWarning) -> None:
    """Hand ``warning`` to the handler, or issue it as a Python warning when there is none (never raise)."""
    if on_error is None:
        warnings.warn(warning, stacklevel=2)
    else:
        on_error(warning)
