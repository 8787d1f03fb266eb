"""A stability check in the spirit of Matbench Discovery: relax, place on the convex hull, classify.

For every held-out structure: relax positions and cell with the calculator
(ASE FIRE on a ``FrechetCellFilter``), then compute its energy above the convex
hull twice with pymatgen's ``PhaseDiagram``: from the reference (DFT) energies
of the whole set, and from the model's relaxed energies of the whole set.
A structure is stable when E_hull ≤ threshold (0 eV/atom); precision, recall
and F1 treat "stable" as the positive class.

Elements without a reference entry of their own (e.g. a set of MO₂ polymorphs
only) get a placeholder terminal entry 1 eV/atom above the highest energy per
atom of the set, so the hull is spanned by the set's own compounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator as AseCalculator
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition

HULL_TOLERANCE = 1e-8  # eV/atom: entries on the hull come out as ±rounding error


@dataclass
class Relaxation:
    atoms: Atoms  # the relaxed structure (its own copy)
    initial_energy: float  # eV
    energy: float  # eV
    fmax: float  # largest remaining force (and scaled-stress) component norm, eV/Å
    steps: int
    converged: bool


def relax(
    atoms: Atoms, calculator: AseCalculator, fmax: float = 0.05, steps: int = 500, relax_cell: bool = True
) -> Relaxation:
    """FIRE on positions (and the cell through ``FrechetCellFilter`` when periodic) until max |F| < ``fmax``."""
    atoms = atoms.copy()
    atoms.calc = calculator
    initial = float(atoms.get_potential_energy())
    target = FrechetCellFilter(atoms) if relax_cell and atoms.pbc.all() else atoms
    optimizer = FIRE(target, logfile=None)
    converged = bool(optimizer.run(fmax=fmax, steps=steps))
    remaining = float(np.sqrt((target.get_forces() ** 2).sum(axis=1).max()))
    return Relaxation(atoms, initial, float(atoms.get_potential_energy()), remaining, optimizer.nsteps, converged)


def energies_above_hull(
    compositions: Sequence[Composition | str], energies: Sequence[float], references: Sequence[PDEntry] = ()
) -> np.ndarray:
    """E_hull (eV/atom) of each (composition, total energy) against the hull of all of them and ``references``."""
    entries = [PDEntry(Composition(c), float(e)) for c, e in zip(compositions, energies)]
    covered = {el for r in references if r.composition.is_element for el in r.composition.elements}
    elements = sorted({el for e in entries for el in e.composition.elements} - covered)
    ceiling = max(e.energy_per_atom for e in [*entries, *references]) + 1.0
    placeholders = [PDEntry(Composition({el: 1}), ceiling) for el in elements]
    diagram = PhaseDiagram([*entries, *references, *placeholders])
    return np.array([diagram.get_e_above_hull(e, allow_negative=True) for e in entries])


def classify(e_hull_true: np.ndarray, e_hull_pred: np.ndarray, threshold: float = 0.0) -> dict[str, float]:
    """Precision, recall, F1 and accuracy of "stable" (E_hull ≤ threshold), with the confusion counts."""
    true = np.asarray(e_hull_true) <= threshold + HULL_TOLERANCE
    pred = np.asarray(e_hull_pred) <= threshold + HULL_TOLERANCE
    tp, fp = int((true & pred).sum()), int((~true & pred).sum())
    fn, tn = int((true & ~pred).sum()), int((~true & ~pred).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": (tp + tn) / len(true),
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


@dataclass
class StabilityReport:
    relaxations: list[Relaxation]
    e_hull_true: np.ndarray  # (S,) eV/atom, reference energies
    e_hull_pred: np.ndarray  # (S,) eV/atom, model's relaxed energies
    metrics: dict[str, float]


def stability_check(
    structures: Sequence[Atoms],
    reference_energies: Sequence[float],
    calculator: AseCalculator,
    references: Sequence[PDEntry] = (),
    fmax: float = 0.05,
    steps: int = 500,
    threshold: float = 0.0,
) -> StabilityReport:
    """Relax every structure with ``calculator``, place both energy sets on their hulls, classify stability."""
    if len(structures) != len(reference_energies):
        raise ValueError(f"{len(structures)} structures but {len(reference_energies)} reference energies")
    relaxations = [relax(a, calculator, fmax, steps) for a in structures]
    compositions = [a.get_chemical_formula() for a in structures]
    e_true = energies_above_hull(compositions, reference_energies, references)
    e_pred = energies_above_hull(compositions, [r.energy for r in relaxations], references)
    metrics = classify(e_true, e_pred, threshold)
    metrics["e_hull_mae"] = float(np.mean(np.abs(e_pred - e_true)))
    return StabilityReport(relaxations, e_true, e_pred, metrics)

