"""pymatgen-style JSON: MPtrj, mlearn lists, Structure / Molecule / ComputedStructureEntry dicts.

Source units and conversions
----------------------------
* positions, lattice: Å (pymatgen ``Structure.as_dict()``: ``lattice.matrix`` rows, ``sites[].xyz``).
* energies: eV totals.  MPtrj: ``energy_key="uncorrected_total_energy"`` by default — the raw VASP
  total, which is what a potential should learn; ``corrected_total_energy`` adds the MP2020
  compatibility corrections (the CHGNet convention) and is kept in ``info``.  Entries
  (``ComputedEntry`` / ``ComputedStructureEntry`` as ``as_dict()`` writes them): the JSON field
  ``energy`` is pymatgen's ``uncorrected_energy`` (the raw DFT total) and is the default;
  ``use_corrected=True`` takes pymatgen's ``entry.energy`` = ``energy + correction`` (the MP2020
  compatibility scheme's).  ``Frame.label_keys["energy"]`` says which.
* entry ``data`` (numpy arrays as MSONable encodes them, or lists): ``forces``/``force`` eV/Å,
  ``virials``/``virial`` eV (W = −V·σ, as dpdata writes them; σ = −W / V), ``stress`` in kB with
  VASP's sign (as MP's task documents), ``magmoms``/``magmom`` μB; ``keys=`` names other members
  (per :mod:`lampretrain.io.labels`), and a label-like member left over is a warning (``ignore=``).
* forces: eV/Å (MPtrj ``force``, mlearn ``outputs.forces``).
* stress: VASP "in kB" with VASP's sign (compression positive).  MPtrj ``stress`` is (3, 3);
  mlearn ``virial_stress`` is 6 values ordered xx, yy, zz, xy, yz, zx.  ASE sign and units:
  ``stress = -value * KBAR_TO_EV_PER_A3``.
* magmoms: μB (MPtrj ``magmom``; a site property ``magmom`` elsewhere).

The file is streamed member by member (:mod:`.json_stream`); a file that is one record
(a single Structure or entry) is read whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from ase.data import atomic_numbers

from lampretrain.frames import KBAR_TO_EV_PER_A3, Frame
from lampretrain.io.errors import ErrorHandler, ReadError, report, source_id
from lampretrain.io.json_stream import JSONStreamError, iter_top_level, open_text
from lampretrain.io.labels import LabelMap

MLEARN_VOIGT = ((0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (2, 0))  # virial_stress order xx yy zz xy yz zx
_RECORD_KEYS = {"@module", "@class", "structure", "lattice", "sites", "outputs"}


class _Bad(Exception):
    """A record-level problem in field ``field``; turned into a ReadError by the caller."""

    def __init__(self, message: str, field: str):
        self.field = field
        super().__init__(message)


def kbar_vasp_to_stress(value: Any) -> np.ndarray:
    """VASP stress in kB (compression positive), (3, 3) → ASE stress in eV/Å³: σ = −p·KBAR_TO_EV_PER_A3."""
    return -np.asarray(value, dtype=np.float64) * KBAR_TO_EV_PER_A3


def mlearn_virial_to_matrix(values: Any) -> np.ndarray:
    """mlearn ``virial_stress`` (xx, yy, zz, xy, yz, zx) → symmetric (3, 3), same units and sign."""
    v = np.asarray(values, dtype=np.float64)
    if v.shape != (6,):
        raise _Bad(f"expected 6 values, got shape {v.shape}", "outputs.virial_stress")
    m = np.empty((3, 3))
    for (i, j), x in zip(MLEARN_VOIGT, v):
        m[i, j] = m[j, i] = x
    return m


def structure_arrays(d: dict) -> dict[str, Any]:
    """positions, numbers, cell, pbc (and site magmoms / charge when given) from a pymatgen dict."""
    sites = d.get("sites")
    if not isinstance(sites, list) or not sites:
        raise _Bad("missing or empty 'sites'", "structure.sites")
    lattice = d.get("lattice")
    cell = None
    if lattice is not None:
        cell = np.asarray(lattice.get("matrix"), dtype=np.float64)
        if cell.shape != (3, 3):
            raise _Bad(f"expected a (3, 3) matrix, got shape {cell.shape}", "structure.lattice.matrix")
    numbers = np.empty(len(sites), dtype=np.int64)
    positions = np.empty((len(sites), 3))
    site_magmoms = []
    for i, site in enumerate(sites):
        species = site.get("species") or []
        if len(species) != 1 or not math.isclose(float(species[0].get("occu", 1.0)), 1.0):
            raise _Bad(f"site {i} is disordered ({species})", f"structure.sites[{i}].species")
        symbol = species[0].get("element")
        if symbol not in atomic_numbers:
            raise _Bad(f"site {i}: unknown element {symbol!r}", f"structure.sites[{i}].species")
        numbers[i] = atomic_numbers[symbol]
        if "xyz" in site:
            positions[i] = site["xyz"]
        elif cell is not None and "abc" in site:
            positions[i] = np.asarray(site["abc"], dtype=np.float64) @ cell
        else:
            raise _Bad(f"site {i} has no coordinates", f"structure.sites[{i}].xyz")
        site_magmoms.append((site.get("properties") or {}).get("magmom"))
    pbc = np.asarray(lattice.get("pbc", (True, True, True)), dtype=bool) if lattice is not None else np.zeros(3, bool)
    out: dict[str, Any] = dict(positions=positions, numbers=numbers, cell=cell, pbc=pbc)
    if all(m is not None for m in site_magmoms):
        out["magmoms"] = np.asarray(site_magmoms, dtype=np.float64)
    if d.get("charge") is not None:
        out["charge"] = float(d["charge"])
    return out


def _plain_scalars(record: dict, skip: set[str]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in skip and isinstance(v, (str, int, float, bool))}


def _array(value: Any, field: str) -> np.ndarray | None:
    if value is None:
        return None
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise _Bad(f"not a numeric array ({exc})", field) from None


def _mptrj_frame(rec: dict, energy_key: str) -> dict[str, Any]:
    if energy_key not in rec:
        raise _Bad(f"missing key {energy_key!r} (keys: {sorted(rec)})", energy_key)
    values = structure_arrays(rec["structure"])
    stress = _array(rec.get("stress"), "stress")
    magmom = rec.get("magmom", rec.get("magmoms"))
    forces_key = "force" if "force" in rec else "forces"  # MPtrj says force, MatPES-style flat records forces
    magmom_key = "magmom" if "magmom" in rec else "magmoms"
    values.update(
        energy=rec[energy_key],
        forces=_array(rec.get(forces_key), forces_key),
        stress=None if stress is None else kbar_vasp_to_stress(stress),
        info=_plain_scalars(rec, {"structure", "force", "forces", "stress", "magmom", "magmoms", energy_key}),
    )
    if magmom is not None:
        values["magmoms"] = _array(magmom, "magmom")
    named = {"energy": energy_key, "forces": forces_key, "stress": "stress (kB)", "magmoms": magmom_key}
    values["label_keys"] = {label: key for label, key in named.items() if values.get(label) is not None}
    return values


def _mlearn_frame(rec: dict) -> dict[str, Any]:
    outputs = rec["outputs"]
    values = structure_arrays(rec["structure"])
    virial = outputs.get("virial_stress")
    values.update(
        energy=outputs.get("energy"),
        forces=_array(outputs.get("forces"), "outputs.forces"),
        stress=None if virial is None else kbar_vasp_to_stress(mlearn_virial_to_matrix(virial)),
        info=_plain_scalars(rec, {"structure", "outputs"}),
    )
    named = {"energy": "outputs.energy", "forces": "outputs.forces", "stress": "outputs.virial_stress (kB)"}
    values["label_keys"] = {label: key for label, key in named.items() if values.get(label) is not None}
    return values


def _decoded(value: Any) -> Any:
    """A numpy array MSONable wrote as ``{"@module": "numpy", "@class": "array", "dtype", "data"}``, decoded."""
    if isinstance(value, dict) and value.get("@module") == "numpy" and value.get("@class") == "array":
        return np.asarray(value["data"], dtype=value.get("dtype", "float64"))
    return np.asarray(value) if isinstance(value, list) else value


def _entry_frame(rec: dict, use_corrected: bool) -> dict[str, Any]:
    """An entry's structure and energy; its ``data`` labels are the caller's (they need the mapping)."""
    if not isinstance(rec.get("structure"), dict):
        raise _Bad("a ComputedEntry without a structure cannot become a frame", "structure")
    energy = float(rec["energy"])
    origin = "energy (pymatgen uncorrected_energy)"
    if use_corrected:
        origin = "energy + correction (pymatgen energy)"
        if rec.get("correction") is not None:
            energy += float(rec["correction"])
        else:
            energy += sum(float(adj.get("value", 0.0)) for adj in rec.get("energy_adjustments") or [])
    values = structure_arrays(rec["structure"])
    info = {"entry_id": rec["entry_id"]} if isinstance(rec.get("entry_id"), (str, int)) else {}
    values.update(energy=energy, info=info, label_keys={"energy": origin})
    return values


def _record_values(rec: Any, energy_key: str, use_corrected: bool) -> dict[str, Any]:
    """Dispatch one JSON record on its layout."""
    if not isinstance(rec, dict):
        raise _Bad(f"expected an object, got {type(rec).__name__}", "record")
    if _is_entry(rec):
        return _entry_frame(rec, use_corrected)
    if "outputs" in rec and "structure" in rec:
        return _mlearn_frame(rec)
    if "structure" in rec:
        return _mptrj_frame(rec, energy_key)
    if "sites" in rec:
        return structure_arrays(rec)
    raise _Bad(f"unrecognised record with keys {sorted(rec)[:8]}", "record")


def _is_entry(rec: dict) -> bool:
    return "Entry" in str(rec.get("@class", ""))


def _is_record(value: Any) -> bool:
    return isinstance(value, dict) and bool(_RECORD_KEYS & value.keys())


def _records(path: Path) -> Iterator[tuple[object, Any]]:
    """(index, record) over the file: list members, MPtrj ``mp_id/frame_id`` pairs, or the one record."""
    with open_text(path) as stream:
        members = iter_top_level(stream)
        first = next(members, None)
        if first is None:
            return
        key, value = first
        if isinstance(key, str) and key not in _RECORD_KEYS and isinstance(value, dict):
            # A mapping of records: MPtrj {mp_id: {frame_id: frame}} or {id: record}.
            for key, value in _chain(first, members):
                if _is_record(value):
                    yield key, value
                elif isinstance(value, dict):
                    for frame_id, rec in value.items():
                        yield f"{key}/{frame_id}", rec
                else:
                    yield key, value
        elif isinstance(key, str):
            yield 0, dict(_chain(first, members))
        else:
            yield from _chain(first, members)


def _chain(first: tuple[object, Any], rest: Iterator[tuple[object, Any]]) -> Iterator[tuple[object, Any]]:
    yield first
    yield from rest


def read_pymatgen_json(
    path: str | Path,
    *,
    dataset: str = "",
    level_of_theory: str = "",
    on_error: ErrorHandler = None,
    energy_key: str = "uncorrected_total_energy",
    use_corrected: bool = False,
    keys: dict[str, str] | None = None,
    ignore: list[str] | None = None,
) -> Iterator[Frame]:
    """Frames from an MPtrj / mlearn / pymatgen JSON file (optionally .gz, .bz2, .xz).

    Entries take the uncorrected energy unless ``use_corrected``; ``keys``/``ignore`` name members of an
    entry's ``data`` (see this module's docstring).
    """
    path = Path(path)
    labels = LabelMap(path, keys, ignore, on_error, convert={"stress": kbar_vasp_to_stress})
    records = _records(path)
    while True:
        try:
            index, rec = next(records)
        except StopIteration:
            return
        except JSONStreamError as exc:
            report(on_error, ReadError(str(exc), path, exc.index))
            return
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            report(on_error, ReadError(f"cannot read file: {exc}", path))
            return
        try:
            values = _record_values(rec, energy_key, use_corrected)
        except _Bad as exc:
            report(on_error, ReadError(str(exc), path, index, exc.field))
            continue
        except (KeyError, TypeError, ValueError) as exc:
            report(on_error, ReadError(f"malformed record: {exc!r}", path, index))
            continue
        if isinstance(index, str) and "/" in index:
            mp_id, frame_id = index.split("/", 1)
            values["info"] = {**values.get("info", {}), "mp_id": mp_id, "frame_id": frame_id}
        frame = Frame(**values, dataset=dataset, level_of_theory=level_of_theory, source=source_id(path, index))
        if _is_entry(rec):
            data = {k: _decoded(v) for k, v in rec["data"].items()} if isinstance(rec.get("data"), dict) else {}
            try:
                labels.apply(frame, index, data, data, ("data", "data"))
            except ReadError as exc:
                report(on_error, exc)
                continue
        yield frame
