"""The canonical record every reader yields and every store holds.

Units inside lampretrain: eV, Å, eV/Å, and stress in eV/Å³ with ASE's sign
(positive = tensile, stress = (1/V) ∂E/∂ε). Readers convert on the way in.
An absent label is ``None``, never zeros: the loss masks it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import UserError

# Conversion factors used by the readers, gathered so each has one definition.
HARTREE_TO_EV = 27.211386245988  # CODATA 2018, as ASE uses
BOHR_TO_ANGSTROM = 0.529177210903
KBAR_TO_EV_PER_A3 = 0.1 / 160.21766208  # 1 kB = 0.1 GPa; 1 eV/Å³ = 160.2177 GPa (ASE's units.GPa)

MAX_ATOMIC_NUMBER = 118
MIN_DISTANCE = 0.1  # Å; two atoms closer than this are a broken record, not physics


class FrameError(UserError, ValueError):
    """A record that cannot be used. ``field`` names the offending label (a CLI reading it prints one line)."""

    def __init__(self, message: str, field: str | None = None, source: str | None = None):
        self.field = field
        self.source = source
        where = f"{source}: " if source else ""
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}{what}{message}")


@dataclass
class Frame:
    """One structure with its DFT labels, in lampretrain units."""

    positions: np.ndarray  # (N, 3) float64, Å
    numbers: np.ndarray  # (N,) int64
    cell: np.ndarray | None = None  # (3, 3) float64, Å, rows are lattice vectors; None for molecules
    pbc: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=bool))  # (3,)
    energy: float | None = None  # eV, the total energy the source reports
    forces: np.ndarray | None = None  # (N, 3) eV/Å
    stress: np.ndarray | None = None  # (3, 3) eV/Å³, ASE sign
    magmoms: np.ndarray | None = None  # (N,) μB
    charge: float | None = None  # e
    spin: float | None = None  # multiplicity - 1 (number of unpaired electrons)
    dataset: str = ""
    level_of_theory: str = ""
    source: str = ""  # "<file>#<index>" (or group path inside the file)
    info: dict[str, Any] = field(default_factory=dict)
    # label → where the reader found it ("calc.forces", "arrays.force", "virial.npy"): the prep census
    # names it; not stored in shards, so a frame read back from a store has none
    label_keys: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self.positions = np.asarray(self.positions, dtype=np.float64)
        self.numbers = np.asarray(self.numbers, dtype=np.int64)
        if self.cell is not None:
            self.cell = np.asarray(self.cell, dtype=np.float64)
        self.pbc = np.broadcast_to(np.asarray(self.pbc, dtype=bool), (3,)).copy()
        if self.energy is not None:
            self.energy = float(self.energy)
        for name in ("forces", "stress", "magmoms"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, np.asarray(value, dtype=np.float64))
        if self.stress is not None and self.stress.shape == (6,):
            self.stress = voigt_to_matrix(self.stress)

    @property
    def natoms(self) -> int:
        return int(self.numbers.shape[0])

    def composition(self) -> dict[int, int]:
        z, count = np.unique(self.numbers, return_counts=True)
        return {int(a): int(b) for a, b in zip(z, count)}

    def validate(self) -> "Frame":
        """Raise :class:`FrameError` naming the field when the record is unusable."""
        n = self.natoms
        src = self.source or None
        if self.numbers.ndim != 1 or n == 0:
            raise FrameError(f"expected a non-empty (N,) array, got shape {self.numbers.shape}", "numbers", src)
        if self.positions.shape != (n, 3):
            raise FrameError(f"expected shape ({n}, 3), got {self.positions.shape}", "positions", src)
        bad_z = self.numbers[(self.numbers < 1) | (self.numbers > MAX_ATOMIC_NUMBER)]
        if bad_z.size:
            raise FrameError(f"unknown element with atomic number {int(bad_z[0])}", "numbers", src)
        if not np.isfinite(self.positions).all():
            raise FrameError("non-finite coordinate", "positions", src)
        if self.pbc.any() and self.cell is None:
            raise FrameError("periodic frame without a cell", "cell", src)
        if self.cell is not None:
            if self.cell.shape != (3, 3) or not np.isfinite(self.cell).all():
                raise FrameError(f"expected a finite (3, 3) cell, got shape {self.cell.shape}", "cell", src)
            if self.pbc.any() and abs(np.linalg.det(self.cell)) < 1e-6:
                raise FrameError("cell has zero volume", "cell", src)
        if self.energy is not None and not np.isfinite(self.energy):
            raise FrameError(f"non-finite value {self.energy}", "energy", src)
        expected = {"forces": (n, 3), "stress": (3, 3), "magmoms": (n,)}
        for name, shape in expected.items():
            value = getattr(self, name)
            if value is None:
                continue
            if value.shape != shape:
                raise FrameError(f"expected shape {shape}, got {value.shape}", name, src)
            if not np.isfinite(value).all():
                raise FrameError("non-finite value", name, src)
        for name in ("charge", "spin"):
            value = getattr(self, name)
            if value is not None and not np.isfinite(value):
                raise FrameError(f"non-finite value {value}", name, src)
        return self

    def content_hash(self) -> str:
        """A digest of the structure and its labels: equal frames hash equal across runs and machines."""
        h = hashlib.blake2b(digest_size=16)
        h.update(np.ascontiguousarray(self.numbers, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(self.positions, dtype="<f8").tobytes())
        h.update(b"cell" + (np.ascontiguousarray(self.cell, dtype="<f8").tobytes() if self.cell is not None else b"-"))
        h.update(self.pbc.astype("u1").tobytes())
        for name in ("energy", "forces", "stress"):
            value = getattr(self, name)
            h.update(name.encode() + (np.asarray(value, dtype="<f8").tobytes() if value is not None else b"-"))
        h.update(self.level_of_theory.encode())
        return h.hexdigest()

    def to_atoms(self):
        """An ASE ``Atoms`` with the labels attached through a SinglePointCalculator."""
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator

        atoms = Atoms(
            numbers=self.numbers,
            positions=self.positions,
            cell=self.cell if self.cell is not None else np.zeros((3, 3)),
            pbc=self.pbc,
        )
        results: dict[str, Any] = {}
        if self.energy is not None:
            results["energy"] = self.energy
            results["free_energy"] = self.energy
        if self.forces is not None:
            results["forces"] = self.forces.copy()
        if self.stress is not None:
            results["stress"] = matrix_to_voigt(self.stress)
        if self.magmoms is not None:
            results["magmoms"] = self.magmoms.copy()
        if results:
            atoms.calc = SinglePointCalculator(atoms, **results)
        atoms.info.update(self.info)
        for key in ("dataset", "level_of_theory", "source", "charge", "spin"):
            value = getattr(self, key)
            if value not in (None, ""):
                atoms.info[key] = value
        return atoms

    @classmethod
    def from_atoms(cls, atoms, **fields: Any) -> "Frame":
        """A frame from an ASE ``Atoms``; labels come from its calculator when one is attached."""
        results = dict(atoms.calc.results) if atoms.calc is not None else {}
        cell = np.array(atoms.cell.array) if atoms.pbc.any() or atoms.cell.rank == 3 else None
        stress = results.get("stress")
        values: dict[str, Any] = dict(
            positions=atoms.get_positions(),
            numbers=atoms.get_atomic_numbers(),
            cell=cell,
            pbc=atoms.pbc,
            energy=results.get("energy"),
            forces=results.get("forces"),
            stress=None if stress is None else np.asarray(stress),
            magmoms=results.get("magmoms"),
            info={k: v for k, v in atoms.info.items() if _is_plain(v)},
        )
        values.update(fields)
        return cls(**values)


def voigt_to_matrix(v: np.ndarray) -> np.ndarray:
    """ASE Voigt order (xx, yy, zz, yz, xz, xy) → symmetric (3, 3)."""
    xx, yy, zz, yz, xz, xy = np.asarray(v, dtype=np.float64)
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def virial_to_stress(virial: Any, cell: np.ndarray) -> np.ndarray:
    """A virial W in eV → ASE stress in eV/Å³: σ = −W / V.

    W = −V·σ is the convention of VASP's "Total" line, DeePMD's ``virial.npy``, dpdata and the extxyz
    fitting sets.  ``virial`` is (..., 3, 3), or per record 9 values (row-major) or 6 in ASE's Voigt
    order (xx, yy, zz, yz, xz, xy); ``cell`` is (..., 3, 3).
    """
    w = np.asarray(virial, dtype=np.float64)
    if w.shape == (6,):
        w = voigt_to_matrix(w)
    elif w.shape == (9,):
        w = w.reshape(3, 3)
    elif w.shape[-2:] != (3, 3):
        raise ValueError(f"a virial has 9 or 6 values or (3, 3), got shape {w.shape}")
    volume = np.abs(np.linalg.det(np.asarray(cell, dtype=np.float64)))
    return -w / np.asarray(volume)[..., None, None]


def matrix_to_voigt(m: np.ndarray) -> np.ndarray:
    """(3, 3) → ASE Voigt order (xx, yy, zz, yz, xz, xy)."""
    m = np.asarray(m, dtype=np.float64)
    return np.array([m[0, 0], m[1, 1], m[2, 2], m[1, 2], m[0, 2], m[0, 1]])


def _is_plain(value: Any) -> bool:
    """True for values that survive a schema'd (non-pickle) encoding."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    if isinstance(value, np.generic):
        return True
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "biuf"
    return False
