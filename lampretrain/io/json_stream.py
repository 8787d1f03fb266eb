"""Streaming the top level of a (possibly compressed) JSON file.

MPtrj ships as one 11 GB JSON object; loading it whole needs tens of GB of Python objects.
:func:`iter_top_level` yields the members of the top-level array or object one at a time,
decoding each with the standard library and holding only the current member in memory.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_CHUNK = 1 << 20
_WHITESPACE = " \t\n\r"


class JSONStreamError(ValueError):
    """The file ends or breaks inside member ``index`` (a list position or an object key)."""

    def __init__(self, message: str, index: object):
        self.index = index
        super().__init__(message)


def open_text(path: str | Path) -> IO[str]:
    """Open a JSON file as text, decompressing by suffix (.gz, .bz2, .xz)."""
    opener = _OPENERS.get(Path(path).suffix, open)
    return opener(path, "rt", encoding="utf-8")


class _Buffer:
    """A read buffer over a text stream that can decode one JSON value at a time."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.text = ""
        self.pos = 0
        self.eof = False
        self.decoder = json.JSONDecoder()

    def _fill(self) -> bool:
        # Read at least as much as is already pending, so retries on a large value cost O(size) in total.
        if self.eof:
            return False
        pending = len(self.text) - self.pos
        data = self.stream.read(max(_CHUNK, pending))
        if not data:
            self.eof = True
            return False
        self.text = self.text[self.pos :] + data
        self.pos = 0
        return True

    def peek(self) -> str:
        """The next non-blank character ('' at the end of the file), not consumed."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self._fill():
                return ""

    def expect(self, chars: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            raise ValueError(f"expected one of {chars!r}, found {c or 'end of file'!r}")
        self.pos += 1
        return c

    def value(self) -> Any:
        if self.peek() not in '{["':
            # A bare scalar has no closing mark: make sure its end is in the buffer.
            while not any(c in self.text[self.pos :] for c in ",]}:" + _WHITESPACE) and self._fill():
                pass
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.text, self.pos)
            except json.JSONDecodeError:
                if self._fill():
                    continue
                raise
            self.pos = end
            return obj


def peek_kind(stream: IO[str]) -> str:
    """'[' or '{' for the top-level container, '' for anything else."""
    c = _Buffer(stream).peek()
    return c if c in "[{" else ""


def iter_top_level(stream: IO[str]) -> Iterator[tuple[object, Any]]:
    """Yield ``(index, value)`` for a top-level array or ``(key, value)`` for a top-level object.

    Raises :class:`JSONStreamError` naming the member where the text stops being valid JSON.
    """
    buf = _Buffer(stream)
    opening = buf.peek()
    if opening not in "[{":
        raise JSONStreamError(f"top level is not an array or object (starts with {opening!r})", 0)
    buf.pos += 1
    closing = "]" if opening == "[" else "}"
    index: object = 0
    count = 0
    if buf.peek() == closing:
        return
    while True:
        index = count
        try:
            if opening == "{":
                index = buf.value()
                if not isinstance(index, str):
                    raise ValueError("object key is not a string")
                buf.expect(":")
            item = buf.value()
        except (ValueError, json.JSONDecodeError) as exc:
            raise JSONStreamError(f"invalid or truncated JSON: {exc}", index) from None
        yield index, item
        count += 1
        try:
            if buf.expect("," + closing) == closing:
                return
        except ValueError as exc:
            raise JSONStreamError(f"invalid or truncated JSON after member {index!r}: {exc}", count) from None
