"""Files ASE reads: extxyz and any other ``ase.io`` format, ASE SQLite ``.db`` and fairchem ``.aselmdb``.

Source units: ASE's own (eV, Å, eV/Å, stress eV/Å³ with ASE's sign), so nothing is converted;
labels come from the attached calculator results (``SinglePointCalculator``), a total ``charge``
from ``atoms.info`` when present.  ``.aselmdb`` (fairchem's LMDB database) needs the
``ase-db-backends`` package, which ``ase.db.connect`` loads for that suffix; its rows are
JSON-encoded, not pickled.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lampretrain.frames import Frame
from lampretrain.io.errors import ErrorHandler, ReadError, report, source_id


def _frame(atoms, path: Path, index: object, dataset: str, level_of_theory: str) -> Frame:
    frame = Frame.from_atoms(atoms, dataset=dataset, level_of_theory=level_of_theory, source=source_id(path, index))
    charge = atoms.info.get("charge")
    if isinstance(charge, (int, float, np.number)):
        frame.charge = float(charge)
    return frame


def read_ase(
    path: str | Path,
    *,
    dataset: str = "",
    level_of_theory: str = "",
    on_error: ErrorHandler = None,
    ase_format: str | None = None,
) -> Iterator[Frame]:
    """Every image of a file ``ase.io.iread`` understands (format guessed by ASE unless given).

    ASE parses image by image; the first image it cannot parse ends the file with one ReadError.
    """
    import ase.io

    path = Path(path)
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
        yield _frame(atoms, path, index, dataset, level_of_theory)
        index += 1


def read_extxyz(
    path: str | Path, *, dataset: str = "", level_of_theory: str = "", on_error: ErrorHandler = None
) -> Iterator[Frame]:
    """Extended XYZ: ``energy``, ``stress`` (ASE sign) in the comment line, ``forces`` per atom."""
    return read_ase(path, dataset=dataset, level_of_theory=level_of_theory, on_error=on_error, ase_format="extxyz")


def read_ase_db(
    path: str | Path, *, dataset: str = "", level_of_theory: str = "", on_error: ErrorHandler = None
) -> Iterator[Frame]:
    """Rows of an ASE database (SQLite ``.db``, ``.aselmdb``, ASE ``.json``) in id order; source ``file#id``."""
    import ase.db

    path = Path(path)
    if not path.exists():
        report(on_error, ReadError("no such database", path))
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
        yield _frame(atoms, path, row.id, dataset, level_of_theory)
