"""DeePMD-kit systems: npy directories and HDF5 files.

Layout (per system): ``type.raw`` (atom type per atom), ``type_map.raw`` (type → element),
an empty ``nopbc`` marker for molecules, and ``set.NNN/{coord,box,energy,force,virial}.npy``
with one row per frame.  In HDF5 each system is a group holding the same names as datasets.

Source units and conversions
----------------------------
* coord, box: Å; energy: eV; force: eV/Å (DeePMD's units, taken as they are).
* virial: eV, DeePMD's sign, i.e. W = −V·σ_ASE (the DeePMD ASE calculator returns
  ``stress = −virial / V``; dpdata writes ``virial = −stress·V`` from ASE).  So
  ``stress = −virial / det(box)``.
* nopbc systems get ``cell=None, pbc=False`` even when a box is stored; a virial there has no
  volume and is left out with a warning, as is any other ``*.npy`` of a set (``atom_ener``,
  ``dipole``, ...), which no Frame label holds.

Arrays are read once per set and sliced per frame (no per-atom Python).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from ase.data import atomic_numbers

from lampretrain.frames import Frame, virial_to_stress
from lampretrain.io.errors import ErrorHandler, ReadError, ReadWarning, report, source_id, warn
from lampretrain.io.hdf5 import groups_with, open_hdf5

Loader = Callable[[str], "np.ndarray | None"]  # "coord" → the set's array, or None when absent
_WIDTHS = ("coord", "box", "energy", "force", "virial")  # the arrays a set may hold that frames use
_LABEL_FILES = {"energy": "energy.npy", "forces": "force.npy", "stress": "virial.npy"}


def is_system_dir(path: Path) -> bool:
    return path.is_dir() and (path / "type.raw").is_file()


def system_dirs(path: Path) -> list[Path]:
    """``path`` itself when it is a system, else every system below it, in sorted order."""
    if is_system_dir(path):
        return [path]
    return sorted(p.parent for p in path.rglob("type.raw") if p.is_file())


def _numbers(types: np.ndarray, type_map: Sequence[str] | None, where: str) -> np.ndarray:
    if type_map is None:
        raise ReadError("no type_map.raw and no type_map option: atom types cannot be named", where, field="type_map")
    try:
        table = np.array([atomic_numbers[name] for name in type_map], dtype=np.int64)
    except KeyError as exc:
        message = f"unknown element {exc.args[0]!r} in type map {list(type_map)}"
        raise ReadError(message, where, field="type_map") from None
    if types.size and (types.min() < 0 or types.max() >= len(table)):
        raise ReadError(f"atom type {int(types.max())} outside type map of {len(table)} names", where, field="type.raw")
    return table[types]


class _SetError(Exception):
    def __init__(self, field: str, message: str, nframes: int):
        self.field, self.message, self.nframes = field, message, nframes
        super().__init__(message)


def _load_set(load: Loader, n: int, nopbc: bool) -> dict[str, np.ndarray]:
    """The set's arrays as (nframes, width) rows, checked against ``n`` atoms."""
    arrays: dict[str, np.ndarray] = {}
    nframes = 0
    widths = dict(zip(_WIDTHS, (3 * n, 9, 1, 3 * n, 9)))
    for name, width in widths.items():
        try:
            value = load(name)
        except (OSError, ValueError) as exc:
            raise _SetError(name, f"cannot read: {exc}", nframes) from None
        if value is None:
            if name == "coord":
                raise _SetError("coord", "missing coord.npy", 0)
            continue
        if name == "coord":
            nframes = len(value)
        if value.ndim == 0 or value.size != nframes * width:
            raise _SetError(name, f"expected {nframes} rows of {width} values, got shape {value.shape}", nframes)
        arrays[name] = value.reshape(nframes, width)
    if "box" not in arrays and not nopbc:
        raise _SetError("box", "periodic system without box.npy (add a 'nopbc' marker for molecules)", nframes)
    return arrays


def _set_frames(
    where: str, prefix: str, load: Loader, members: list[str], numbers: np.ndarray, nopbc: bool, common: dict,
    on_error: ErrorHandler,
) -> Iterator[Frame]:
    """Frames of one ``set.NNN`` (holding ``members``); record ``k`` is ``<where>#<prefix><k>``.

    A set whose arrays do not fit is reported frame by frame.
    """
    n = len(numbers)
    unread = sorted(m for m in members if m.endswith(".npy") and m[: -len(".npy")] not in _WIDTHS)
    if nopbc and "virial.npy" in members:
        unread.append("virial.npy")
    if unread:
        why = "; a nopbc system has no volume for virial.npy" if "virial.npy" in unread else ""
        message = f"{', '.join(unread)} not read (no Frame label holds them{why})"
        warn(on_error, ReadWarning(message, where, f"{prefix}0", keys=unread))
    try:
        arrays = _load_set(load, n, nopbc)
    except _SetError as exc:
        for k in range(max(exc.nframes, 1)):
            report(on_error, ReadError(exc.message, where, f"{prefix}{k}", f"{exc.field}.npy"))
        return
    nframes = len(arrays["coord"])
    positions = arrays["coord"].reshape(nframes, n, 3).astype(np.float64)
    cells = None if nopbc else arrays["box"].reshape(nframes, 3, 3).astype(np.float64)
    energy = arrays["energy"][:, 0].astype(np.float64) if "energy" in arrays else None
    forces = arrays["force"].reshape(nframes, n, 3).astype(np.float64) if "force" in arrays else None
    stress = None
    if "virial" in arrays and cells is not None:
        stress = virial_to_stress(arrays["virial"].reshape(nframes, 3, 3).astype(np.float64), cells)
    pbc = not nopbc
    found = {"energy": energy, "forces": forces, "stress": stress}
    label_keys = {label: _LABEL_FILES[label] for label, value in found.items() if value is not None}
    for k in range(nframes):
        yield Frame(
            positions=positions[k],
            numbers=numbers,
            cell=None if cells is None else cells[k],
            pbc=pbc,
            energy=None if energy is None else energy[k],
            forces=None if forces is None else forces[k],
            stress=None if stress is None else stress[k],
            source=source_id(where, f"{prefix}{k}"),
            label_keys=dict(label_keys),
            **common,
        )


def _read_type_map(path: Path) -> list[str] | None:
    return path.read_text().split() if path.is_file() else None


def _npy_system(system: Path, type_map: Sequence[str] | None, common: dict, on_error: ErrorHandler) -> Iterator[Frame]:
    try:
        types = np.loadtxt(system / "type.raw", dtype=np.int64, ndmin=1)
        numbers = _numbers(types, type_map or _read_type_map(system / "type_map.raw"), str(system))
    except ReadError as exc:
        report(on_error, exc)
        return
    except ValueError as exc:
        report(on_error, ReadError(f"cannot parse: {exc}", system, field="type.raw"))
        return
    nopbc = (system / "nopbc").exists()
    for set_dir in sorted(p for p in system.glob("set.*") if p.is_dir()):

        def load(name: str, set_dir: Path = set_dir) -> np.ndarray | None:
            file = set_dir / f"{name}.npy"
            return np.load(file, allow_pickle=False) if file.is_file() else None

        members = sorted(p.name for p in set_dir.iterdir())
        yield from _set_frames(str(set_dir), "", load, members, numbers, nopbc, common, on_error)


def read_deepmd_npy(
    path: str | Path,
    *,
    dataset: str = "",
    level_of_theory: str = "",
    on_error: ErrorHandler = None,
    type_map: Sequence[str] | None = None,
) -> Iterator[Frame]:
    """Frames of one DeePMD npy system directory, or of every system below a directory."""
    common = dict(dataset=dataset, level_of_theory=level_of_theory)
    systems = system_dirs(Path(path))
    if not systems:
        report(on_error, ReadError("no DeePMD system (type.raw) found", path, field="type.raw"))
    for system in systems:
        yield from _npy_system(system, type_map, common, on_error)


def read_deepmd_hdf5(
    path: str | Path,
    *,
    dataset: str = "",
    level_of_theory: str = "",
    on_error: ErrorHandler = None,
    type_map: Sequence[str] | None = None,
) -> Iterator[Frame]:
    """Frames of every DeePMD system stored as a group of an HDF5 file (dpdata's ``deepmd/hdf5``)."""
    common = dict(dataset=dataset, level_of_theory=level_of_theory)
    try:
        h5 = open_hdf5(path)
    except ReadError as exc:
        report(on_error, exc)
        return
    with h5:
        systems = groups_with(h5, ("type.raw",))
        if not systems:
            report(on_error, ReadError("no DeePMD system (type.raw) found", path, field="type.raw"))
        for name in systems:
            g = h5[name] if name else h5
            where = f"{path}#{name}" if name else str(path)
            try:
                names = type_map
                if names is None and "type_map.raw" in g:
                    names = [s.decode() if isinstance(s, bytes) else str(s) for s in g["type_map.raw"][()]]
                numbers = _numbers(np.asarray(g["type.raw"][()], dtype=np.int64).reshape(-1), names, where)
            except ReadError as exc:
                report(on_error, exc)
                continue
            nopbc = "nopbc" in g and bool(np.asarray(g["nopbc"][()]).all())
            for set_name in sorted(k for k in g.keys() if k.startswith("set.")):
                sg = g[set_name]

                def load(key: str, sg=sg) -> np.ndarray | None:
                    return sg[f"{key}.npy"][()] if f"{key}.npy" in sg else None

                prefix = f"{name}/{set_name}/" if name else f"{set_name}/"
                yield from _set_frames(str(path), prefix, load, sorted(sg.keys()), numbers, nopbc, common, on_error)
