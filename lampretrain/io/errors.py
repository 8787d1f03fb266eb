"""Errors raised by the readers, and the one rule for reporting them.

A reader reports a record it cannot turn into a :class:`~lampretrain.frames.Frame` through
:func:`report`: with ``on_error=None`` the error is raised, otherwise the callback gets it and
the reader carries on with the next record (or stops, when the file itself is damaged).
"""

from __future__ import annotations

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


ErrorHandler = Callable[[ReadError], None] | None


def report(on_error: ErrorHandler, error: ReadError) -> None:
    """Raise ``error`` when there is no handler, else hand it over and return."""
    if on_error is None:
        raise error
    on_error(error)
