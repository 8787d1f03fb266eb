"""Files ASE reads: extxyz and any other ``ase.io`` format, ASE SQLite ``.db`` and fairchem ``.aselmdb``.

Source units: ASE's own (eV, Å, eV/Å, stress eV/Å³ with ASE's sign), so nothing is converted
except a virial (eV, σ = −W / V).  Labels come from the attached calculator results
(``SinglePointCalculator``), a total ``charge`` from ``atoms.info`` when present; ``keys=`` maps
labels stored under other names (``{"energy": "DFT_energy", "forces": "force", "virial": "virial"}``:
per-atom ones from ``atoms.arrays``, the rest from ``atoms.info``), a ``force`` array or a
``virial`` is taken when nothing else gives the label, and any other label-like key is a warning
(:mod:`lampretrain.io.labels`; ``ignore=`` silences it).  ``.aselmdb`` (fairchem's LMDB database) needs the
``ase-db-backends`` package, which ``ase.db.connect`` loads for that suffix; its rows are
JSON-encoded, not pickled.
"""

from __future__ import annotations

import codecs
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from ase.data import atomic_numbers

from lampretrain.frames import Frame
from lampretrain.io.errors import ErrorHandler, ReadError, report, source_id
from lampretrain.io.labels import LabelMap

# Per-atom arrays ASE itself keeps (not DFT labels) and calculator results a Frame has a place for.
_ASE_ARRAYS = frozenset({"numbers", "positions", "momenta", "masses", "initial_magmoms", "initial_charges", "tags"})
_RESULTS = ("energy", "forces", "stress", "magmoms")
# Results that repeat one a Frame keeps (free energy beside energy, the total moment beside the per-atom
# ones): left out without a warning, as no label is lost
_DERIVED = {"free_energy": "energy", "magmom": "magmoms"}


def _frame(atoms, path: Path, index: object, dataset: str, level_of_theory: str, labels: LabelMap) -> Frame:
    """The frame of one image: calculator results, then ``labels``' mapping; raises ReadError for a bad label."""
    frame = Frame.from_atoms(atoms, dataset=dataset, level_of_theory=level_of_theory, source=source_id(path, index))
    frame.label_keys = {name: f"calc.{name}" for name in _RESULTS if getattr(frame, name) is not None}
    charge = atoms.info.get("charge")
    taken = set(_ASE_ARRAYS)
    if isinstance(charge, (int, float, np.number)):
        frame.charge = float(charge)
        frame.label_keys["charge"] = "info.charge"
        taken.add("charge")
    results = dict(atoms.calc.results) if atoms.calc is not None else {}
    unused = {k: v for k, v in results.items() if k not in _RESULTS and _DERIVED.get(k) not in results}
    labels.apply(frame, index, atoms.arrays, atoms.info, ("arrays", "info"), taken)
    labels.check_unmapped(frame, index, [("calculator result", unused)], ())
    return frame


def read_ase(
    path: str | Path,
    *,
    dataset: str = "",
    level_of_theory: str = "",
    on_error: ErrorHandler = None,
    ase_format: str | None = None,
    keys: dict[str, str] | None = None,
    ignore: list[str] | None = None,
) -> Iterator[Frame]:
    """Every image of a file ``ase.io.iread`` understands (format guessed by ASE unless given).

    ASE parses image by image; the first image it cannot parse ends the file with one ReadError.
    ``keys``/``ignore``: see this module's docstring.
    """
    import ase.io

    path = Path(path)
    labels = LabelMap(path, keys, ignore, on_error)
    index = 0
    images = ase.io.iread(path, index=":", format=ase_format)
    while True:
        try:
            atoms = next(images)
        except StopIteration:
            return
        except Exception as exc:  # ASE raises many types (XYZError, ValueError, IndexError, ...)
            report(on_error, ReadError(f"unreadable from image {index} on: {exc}", path, index))
            return
        try:
            yield _frame(atoms, path, index, dataset, level_of_theory, labels)
        except ReadError as exc:
            report(on_error, exc)
        index += 1


_BINARY_PROBE = 8192  # bytes looked at to tell a text file from a binary one, as git and grep do


def _is_count(line: str) -> bool:
    """A lone non-negative integer: an extxyz atom-count line (an atom line never is one)."""
    text = line.strip()
    return text.isascii() and text.isdigit()


def _looks_binary(head: bytes) -> bool:
    if b"\0" in head:
        return True
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at the end is fine
    except UnicodeDecodeError:
        return True
    return False


class _Lines:
    """A text file's lines with 1-based numbers and a one-line push-back, so a frame can look past its end."""

    def __init__(self, handle):
        self._lines = enumerate(handle, 1)
        self._back: tuple[int, str] | None = None

    def next(self) -> tuple[int, str] | None:
        if self._back is not None:
            item, self._back = self._back, None
            return item
        return next(self._lines, None)

    def next_nonblank(self) -> tuple[int, str] | None:
        while (item := self.next()) is not None and not item[1].strip():
            pass
        return item

    def push(self, item: tuple[int, str]) -> None:
        self._back = item

    def skip_to_count(self, last: int) -> tuple[int, int]:
        """Consume lines up to the next count line (left unread); returns (non-blank lines, last line number)."""
        skipped = 0
        while (item := self.next()) is not None:
            if _is_count(item[1]):
                self.push(item)
                break
            last = item[0]
            skipped += bool(item[1].strip())
        return skipped, last


def _split_frames(handle) -> Iterator[tuple[int, list[str] | None, str | None]]:
    """(first line number, the frame's lines, None) per frame, or (first line number, None, why) per broken record.

    A frame is a count line, a comment line and ``count`` atom lines.  ASE's own reader stops the file at
    the first bad frame; splitting here first confines damage to one record: a wrong count is found where
    a lone integer (the next header) interrupts the atom lines, or where atom lines go on past the count.
    """
    lines = _Lines(handle)
    while (item := lines.next_nonblank()) is not None:
        start, header = item
        if not _is_count(header):
            _, last = lines.skip_to_count(start)
            where = f"line {start}" if last == start else f"lines {start}-{last}"
            yield start, None, f"{where}: not an extxyz frame, expected an atom count, got {header.strip()[:40]!r}"
            continue
        count = int(header)
        says = f"header on line {start} says {count} atoms"
        comment = lines.next()
        if comment is None:
            yield start, None, f"{says}, the file ends before its comment line (truncated)"
            return
        atoms: list[str] = []
        while len(atoms) < count:
            item = lines.next()
            if item is None:
                yield start, None, f"{says}, the file ends after {len(atoms)} of them (truncated)"
                return
            if _is_count(item[1]):
                lines.push(item)
                break
            atoms.append(item[1])
        if len(atoms) < count:
            yield start, None, f"{says}, {len(atoms)} atom lines follow before the next header on line {item[0]}"
            continue
        after = lines.next_nonblank()
        if after is not None and not _is_count(after[1]) and atoms and len(after[1].split()) == len(atoms[-1].split()):
            extra, last = lines.skip_to_count(after[0])  # more atom lines than the header says
            yield start, None, f"{says}, {count + 1 + extra} atom lines follow (lines {start + 2}-{last})"
            continue
        if after is not None:
            lines.push(after)  # the next header, or text that is reported as a record of its own
        elif atoms and not atoms[-1].endswith("\n"):
            # a copy cut inside the last line can end mid-number and still parse, with a wrong value
            yield start, None, f"the file ends inside line {start + 1 + count} without a newline (truncated)"
            return
        yield start, [header, comment[1], *atoms], None


def _frame_error(exc: Exception, index: int, start: int, text: list[str]) -> str:
    """What went wrong in frame ``index`` (first line ``start``), in words rather than ASE's exception."""
    symbol = exc.args[0] if isinstance(exc, KeyError) and exc.args else None
    if isinstance(symbol, str) and symbol not in atomic_numbers:  # ASE's symbol lookup failed
        line = next((start + k for k, row in enumerate(text) if k >= 2 and symbol in row.split()), start)
        return f"unknown element {symbol!r} in frame {index} (line {line})"
    return f"frame {index} (lines {start}-{start + len(text) - 1}) cannot be parsed: {type(exc).__name__}: {exc}"


def read_extxyz(
    path: str | Path,
    *,
    dataset: str = "",
    level_of_theory: str = "",
    on_error: ErrorHandler = None,
    keys: dict[str, str] | None = None,
    ignore: list[str] | None = None,
) -> Iterator[Frame]:
    """Extended XYZ: ``energy``, ``stress`` (ASE sign) in the comment line, ``forces`` per atom.

    Other names (``DFT_energy``, ``force``, ``virial``) through ``keys``/``ignore``: see this module's docstring.

    The file is split into frames here and each frame is parsed by ASE on its own, so a bad frame (unknown
    element, wrong atom count, unparsable number) is one ReadError at its own index and reading goes on with
    the next frame.  A binary file, or one with nothing but blank lines, is one ReadError for the file.
    """
    import ase.io

    path = Path(path)
    labels = LabelMap(path, keys, ignore, on_error)
    with open(path, "rb") as raw:
        if _looks_binary(raw.read(_BINARY_PROBE)):
            report(on_error, ReadError("binary content (NUL bytes or invalid UTF-8), not extxyz text", path))
            return
    index = -1
    # utf-8-sig drops a Windows editor's byte-order mark, which would hide the first count line; damage
    # past the probe becomes U+FFFD and so reaches only the frame it is in
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        for index, (start, text, problem) in enumerate(_split_frames(handle)):
            if problem is not None:
                report(on_error, ReadError(problem, path, index))
                continue
            try:
                atoms = ase.io.read(io.StringIO("".join(text)), format="extxyz", index=0)
                frame = _frame(atoms, path, index, dataset, level_of_theory, labels)
            except ReadError as exc:  # a mapped label that cannot be used, named by the mapping
                report(on_error, exc)
                continue
            except Exception as exc:  # ASE raises KeyError, ValueError, XYZError, IndexError, ... per frame
                report(on_error, ReadError(_frame_error(exc, index, start, text), path, index))
                continue
            yield frame
    if index < 0:
        report(on_error, ReadError("empty file (only blank lines)", path))


def read_ase_db(
    path: str | Path,
    *,
    dataset: str = "",
    level_of_theory: str = "",
    on_error: ErrorHandler = None,
    keys: dict[str, str] | None = None,
    ignore: list[str] | None = None,
) -> Iterator[Frame]:
    """Rows of an ASE database (SQLite ``.db``, ``.aselmdb``, ASE ``.json``) in id order; source ``file#id``.

    A row's ``key_value_pairs`` and ``data`` count as ``atoms.info`` for ``keys``/``ignore``.
    """
    import ase.db

    path = Path(path)
    labels = LabelMap(path, keys, ignore, on_error)
    if not path.exists():
        report(on_error, ReadError("no such database", path))
        return
    if path.suffix == ".aselmdb":
        # ase-db-backends reopens a file it failed to open from its __del__, which prints a traceback past
        # any handler ("Exception ignored in ..."), so a damaged file is caught here first
        import lmdb

        try:
            lmdb.open(str(path), subdir=False, readonly=True, lock=False).close()
        except lmdb.Error as exc:
            report(on_error, ReadError(f"cannot open database: {exc}", path))
            return
    try:
        db = ase.db.connect(str(path), use_lock_file=False, **({"readonly": True} if path.suffix == ".aselmdb" else {}))
        rows = db.select()
    except Exception as exc:  # a corrupt SQLite/LMDB file raises backend-specific errors
        report(on_error, ReadError(f"cannot open database: {exc}", path))
        return
    last_id: object = None
    while True:
        try:
            row = next(rows)
            atoms = row.toatoms()
        except StopIteration:
            return
        except Exception as exc:
            after = f"after row id {last_id}" if last_id is not None else "at the first row"
            report(on_error, ReadError(f"unreadable {after}: {exc}", path, last_id))
            return
        last_id = row.id
        atoms.info.update(row.key_value_pairs)
        atoms.info.update(row.get("data") or {})
        try:
            yield _frame(atoms, path, row.id, dataset, level_of_theory, labels)
        except ReadError as exc:
            report(on_error, exc)
