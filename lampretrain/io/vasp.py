"""VASP output: ``vasprun.xml``, ``OUTCAR``, and a run directory holding both.

Every ionic step becomes a frame, parsed by ASE.  Source units and conversions (done by ASE,
checked in the tests against the numbers in the files):

* energy: eV, the energy ASE reports for the step;
* forces: eV/Å;
* stress: VASP prints "in kB" with compression positive; ASE stress = −value × 0.1 GPa in eV/Å³
  (= −value × KBAR_TO_EV_PER_A3);
* magmoms: μB per site, only in OUTCAR (``magnetization (x)`` table of each step).

A run directory reads ``vasprun.xml`` (more digits) and takes each step's magnetic moments from
the ``OUTCAR`` beside it when that step's positions agree.  A file that stops early (a killed
job, a truncated copy) yields its complete steps and then one ReadError for the rest.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lampretrain.frames import Frame
from lampretrain.io.ase_formats import read_ase
from lampretrain.io.errors import ErrorHandler, ReadError, ReadWarning, report, warn

_XML_END = b"</modeling>"
_OUTCAR_END = b"General timing and accounting"
_TAIL_BYTES = 1 << 16
_SAME_POSITIONS_ATOL = 1e-3  # Å; OUTCAR prints positions with 5 decimals


def _ends_with(path: Path, marker: bytes) -> bool:
    """True when ``marker`` is in the last bytes of the file (VASP writes it only on a clean finish)."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - _TAIL_BYTES))
        return marker in fh.read()


def _steps(path: Path, ase_format: str, end_marker: bytes, common: dict, on_error: ErrorHandler) -> Iterator[Frame]:
    """ASE's steps, then one ReadError when the file lacks VASP's closing section."""
    count = 0
    failed = []

    def held_back(err: ReadError) -> None:  # a warning passes at once; an error waits for the frames before it
        if isinstance(err, ReadWarning):
            warn(on_error, err)
        else:
            failed.append(err)

    for frame in read_ase(path, ase_format=ase_format, on_error=held_back, **common):
        count += 1
        yield frame
    if failed:
        report(on_error, failed[0])
    elif not _ends_with(path, end_marker):
        message = f"file ends before VASP finished: ionic steps from {count} on are missing or incomplete"
        report(on_error, ReadError(message, path, count))


def read_vasprun(
    path: str | Path, *, dataset: str = "", level_of_theory: str = "", on_error: ErrorHandler = None
) -> Iterator[Frame]:
    """Every ionic step of a ``vasprun.xml``."""
    common = dict(dataset=dataset, level_of_theory=level_of_theory)
    return _steps(Path(path), "vasp-xml", _XML_END, common, on_error)


def read_outcar(
    path: str | Path, *, dataset: str = "", level_of_theory: str = "", on_error: ErrorHandler = None
) -> Iterator[Frame]:
    """Every ionic step of an ``OUTCAR``, with per-site magnetic moments when spin-polarised."""
    common = dict(dataset=dataset, level_of_theory=level_of_theory)
    return _steps(Path(path), "vasp-out", _OUTCAR_END, common, on_error)


def read_vasp_dir(
    path: str | Path, *, dataset: str = "", level_of_theory: str = "", on_error: ErrorHandler = None
) -> Iterator[Frame]:
    """A VASP run directory: steps from ``vasprun.xml``, magmoms from ``OUTCAR`` (either may be absent)."""
    path = Path(path)
    xml, outcar = path / "vasprun.xml", path / "OUTCAR"
    common = dict(dataset=dataset, level_of_theory=level_of_theory, on_error=on_error)
    if not xml.is_file():
        yield from read_outcar(outcar, **common)
        return
    if not outcar.is_file():
        yield from read_vasprun(xml, **common)
        return
    # OUTCAR only lends magmoms here, so its damage is not a record error: frames keep magmoms=None.
    magmom_steps = read_outcar(outcar, dataset=dataset, level_of_theory=level_of_theory, on_error=lambda err: None)
    for frame in read_vasprun(xml, **common):
        partner = next(magmom_steps, None)
        if (
            partner is not None
            and partner.magmoms is not None
            and partner.natoms == frame.natoms
            and np.allclose(partner.positions, frame.positions, atol=_SAME_POSITIONS_ATOL)
        ):
            frame.magmoms = partner.magmoms
            frame.label_keys["magmoms"] = "OUTCAR magnetization (x)"
        yield frame
