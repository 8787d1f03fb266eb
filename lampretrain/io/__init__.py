"""Readers: one per input format, each yielding :class:`~lampretrain.frames.Frame` in lampretrain units.

``read_frames(path)`` guesses the format from the name (and, for HDF5 and JSON, the contents):

============================  ====================  ==========================================
path                          format                reader
============================  ====================  ==========================================
dir with ``type.raw``          ``deepmd``            DeePMD npy system (also a dir of systems)
dir with vasprun.xml/OUTCAR   ``vasp_dir``          steps from vasprun.xml, magmoms from OUTCAR
other directory               ``directory``         every recognised file below, sorted
``vasprun*.xml``              ``vasprun``           all ionic steps
``OUTCAR*``                   ``outcar``            all ionic steps, magmoms
``*.h5``/``*.hdf5``            ``spice_hdf5``        groups with conformations + dft_total_energy
                              ``ani_hdf5``          groups with coordinates + ``<method>.energy``
                              ``deepmd_hdf5``       groups with ``type.raw``
``*.json[.gz|.bz2|.xz]``       ``pymatgen_json``     MPtrj (alias ``mptrj``), mlearn lists, Structure / entries
``*.db``                      ``ase_db``            ASE SQLite database
``*.aselmdb``                 ``aselmdb``           fairchem's ASE LMDB database
``*.xyz``/``*.extxyz``         ``extxyz``            extended XYZ
anything else                 ``ase``               whatever ``ase.io.iread`` reads
============================  ====================  ==========================================

Every frame carries ``dataset`` and ``level_of_theory`` from the call and a ``source`` naming
file and record.  Errors: see :mod:`lampretrain.io.errors` (``on_error=None`` raises).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lampretrain.frames import Frame
from lampretrain.io.ani import read_ani_hdf5
from lampretrain.io.ase_formats import read_ase, read_ase_db, read_extxyz
from lampretrain.io.deepmd import is_system_dir, read_deepmd_hdf5, read_deepmd_npy
from lampretrain.io.errors import ErrorHandler, ReadError, ReadWarning, report
from lampretrain.io.hdf5 import open_hdf5
from lampretrain.io.pymatgen_json import read_pymatgen_json
from lampretrain.io.spice import read_spice_hdf5
from lampretrain.io.vasp import read_outcar, read_vasp_dir, read_vasprun

__all__ = ["FORMATS", "ReadError", "ReadWarning", "guess_format", "read_frames", "takes_option"]

_HDF5_SUFFIXES = (".h5", ".hdf5")
_JSON_SUFFIXES = (".json", ".json.gz", ".json.bz2", ".json.xz")
_XYZ_SUFFIXES = (".xyz", ".extxyz")
_ASE_SUFFIXES = (".traj", ".cif", ".vasp", ".poscar")


def _is_vasprun(name: str) -> bool:
    return name.startswith("vasprun") and ".xml" in name


def _is_outcar(name: str) -> bool:
    return name.startswith("OUTCAR")


def _sniff_hdf5(path: Path) -> str:
    """The HDF5 layout from the first group that identifies one."""
    found: list[str] = []

    def visit(name: str, obj) -> Any:
        if not hasattr(obj, "keys"):
            return None
        keys = set(obj.keys())
        if "type.raw" in keys:
            found.append("deepmd_hdf5")
        elif "conformations" in keys and "dft_total_energy" in keys:
            found.append("spice_hdf5")
        elif "coordinates" in keys and any(k.endswith(".energy") for k in keys):
            found.append("ani_hdf5")
        return True if found else None

    with open_hdf5(path) as h5:
        if "type.raw" in h5:
            return "deepmd_hdf5"
        h5.visititems(visit)
        h5_keys = list(h5.keys())
    if not found:
        top = sorted(h5_keys)[:10]
        raise ReadError(f"HDF5 file with no SPICE, ANI-1x or DeePMD group (top-level keys {top})", path, field="format")
    return found[0]


def _recognised_file(name: str) -> str | None:
    """The format a file name alone identifies, or None."""
    lower = name.lower()
    if _is_vasprun(name):
        return "vasprun"
    if _is_outcar(name):
        return "outcar"
    if lower.endswith(_HDF5_SUFFIXES):
        return "hdf5"
    if lower.endswith(_JSON_SUFFIXES):
        return "pymatgen_json"
    if lower.endswith(".db"):
        return "ase_db"
    if lower.endswith(".aselmdb"):
        return "aselmdb"
    if lower.endswith(_XYZ_SUFFIXES):
        return "extxyz"
    if lower.endswith(_ASE_SUFFIXES):
        return "ase"
    return None


def guess_format(path: str | Path) -> str:
    """The name in :data:`FORMATS` that reads ``path`` (see the table in this module's docstring)."""
    path = Path(path)
    if path.is_dir():
        if is_system_dir(path):
            return "deepmd"
        if (path / "vasprun.xml").is_file() or (path / "OUTCAR").is_file():
            return "vasp_dir"
        children = [p for p in path.iterdir() if not p.name.startswith(".")]
        subdirs = [p for p in children if p.is_dir()]
        if (
            subdirs
            and all(is_system_dir(p) for p in subdirs)
            and not any(_recognised_file(p.name) for p in children if p.is_file())
        ):
            return "deepmd"
        return "directory"
    if not path.exists():
        raise ReadError("no such file or directory", path)
    fmt = _recognised_file(path.name) or "ase"
    return _sniff_hdf5(path) if fmt == "hdf5" else fmt


def read_directory(
    path: str | Path, *, dataset: str = "", level_of_theory: str = "", on_error: ErrorHandler = None, **options: Any
) -> Iterator[Frame]:
    """Every recognised input below ``path`` in sorted order; unrecognised files (READMEs) are skipped.

    ``options`` reach each reader that accepts them.
    """
    common = dict(dataset=dataset, level_of_theory=level_of_theory, on_error=on_error)
    for child in sorted(Path(path).iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_file() and _recognised_file(child.name) is None:
            continue
        if _reported_empty(child, on_error):
            continue
        try:
            fmt = guess_format(child)
        except ReadError as exc:
            report(on_error, exc)
            continue
        reader = FORMATS[fmt]
        yield from reader(child, **common, **_accepted(reader, options))


def _reported_empty(path: Path, on_error: ErrorHandler) -> bool:
    """Report a zero-byte file, which every reader would otherwise take as zero records or a format error."""
    if not (path.is_file() and path.stat().st_size == 0):
        return False
    report(on_error, ReadError("empty file", path))
    return True


def _accepted(reader: Callable, options: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(reader).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return options
    return {k: v for k, v in options.items() if k in params}


FORMATS: dict[str, Callable[..., Iterator[Frame]]] = {
    "extxyz": read_extxyz,
    "ase": read_ase,
    "vasprun": read_vasprun,
    "outcar": read_outcar,
    "vasp_dir": read_vasp_dir,
    "pymatgen_json": read_pymatgen_json,
    "mptrj": read_pymatgen_json,  # the same reader under the name data-prep specs use for MPtrj
    "deepmd": read_deepmd_npy,
    "deepmd_hdf5": read_deepmd_hdf5,
    "ase_db": read_ase_db,
    "aselmdb": read_ase_db,
    "spice_hdf5": read_spice_hdf5,
    "ani_hdf5": read_ani_hdf5,
    "directory": read_directory,
}


def takes_option(format: str, option: str) -> bool:
    """Whether the reader of ``format`` takes ``option`` (the directory reader passes options on)."""
    reader = FORMATS[format]
    return format == "directory" or option in inspect.signature(reader).parameters


def read_frames(
    path: str | Path,
    format: str | None = None,
    *,
    dataset: str = "",
    level_of_theory: str = "",
    on_error: ErrorHandler = None,
    **options: Any,
) -> Iterator[Frame]:
    """Frames of any supported file or directory; ``format`` is guessed when not given.

    ``options`` go to the reader (e.g. ``method=`` for ANI, ``energy_key=`` for MPtrj,
    ``type_map=`` for DeePMD, ``keys=``/``ignore=`` for the ASE formats and pymatgen entries:
    :mod:`lampretrain.io.labels`); an option no reader takes is a TypeError.  Label-like data a
    reader leaves out reaches ``on_error`` as a :class:`ReadWarning` (a Python warning without one).
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; known: {sorted(FORMATS)}")
    if _reported_empty(Path(path), on_error):
        return iter(())
    try:
        fmt = format or guess_format(path)  # always a FORMATS name
    except ReadError as exc:  # a missing path, or an HDF5 file that is damaged or of no known layout
        report(on_error, exc)
        return iter(())
    reader = FORMATS[fmt]
    if fmt == "directory":
        known = {name for r in FORMATS.values() for name in inspect.signature(r).parameters}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown reader option(s) {unknown}")
    return reader(path, dataset=dataset, level_of_theory=level_of_theory, on_error=on_error, **options)
