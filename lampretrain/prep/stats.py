"""Per-dataset statistics written beside the index (``stats.json``).

Element references solve min_r Σ_f (E_f − Σ_z n_fz r_z)² in float64 over the
training frames of one dataset (``numpy.linalg.lstsq``; when compositions do
not determine every element, e.g. all frames are H128O64, it returns the
minimum-norm solution, which still reproduces the fitted energies).
Residuals are per atom: (E_f − Σ_z n_fz r_z) / N_f.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def element_references(counts: np.ndarray, energies: np.ndarray) -> np.ndarray:
    """Least-squares references r (n_elements,) with counts (F, n_elements) and energies (F,)."""
    refs, *_ = np.linalg.lstsq(counts.astype(np.float64), energies.astype(np.float64), rcond=None)
    return refs


def dataset_stats(
    z_lists: list[list[int]],
    count_lists: list[list[int]],
    energies: list[float | None],
    natoms: np.ndarray,
    n_edges: np.ndarray,
    force_sq: list[float | None],
) -> dict[str, Any]:
    """Statistics of one dataset's training frames."""
    natoms = np.asarray(natoms, dtype=np.float64)
    elements = sorted({z for zs in z_lists for z in zs})
    column = {z: k for k, z in enumerate(elements)}
    counts = np.zeros((len(z_lists), len(elements)))
    for row, (zs, cs) in enumerate(zip(z_lists, count_lists)):
        for z, c in zip(zs, cs):
            counts[row, column[z]] = c
    has_energy = np.array([e is not None for e in energies], dtype=bool)
    stats: dict[str, Any] = {
        "frames": len(z_lists),
        "atoms": int(natoms.sum()),
        "elements": elements,
        "avg_num_neighbors": float(np.sum(n_edges) / max(natoms.sum(), 1)),
        "frames_with_energy": int(has_energy.sum()),
    }
    if has_energy.any():
        e = np.array([x for x in energies if x is not None], dtype=np.float64)
        refs = element_references(counts[has_energy], e)
        residual = (e - counts[has_energy] @ refs) / natoms[has_energy]
        per_atom = e / natoms[has_energy]
        stats.update(
            element_references={str(z): float(r) for z, r in zip(elements, refs)},
            energy_per_atom_mean=float(per_atom.mean()),
            energy_per_atom_std=float(per_atom.std()),
            residual_per_atom_mean=float(residual.mean()),
            residual_per_atom_rms=float(np.sqrt(np.mean(residual**2))),
        )
    has_forces = [f is not None for f in force_sq]
    if any(has_forces):
        total = sum(f for f in force_sq if f is not None)
        components = 3 * natoms[np.array(has_forces)].sum()
        stats["force_rms"] = float(np.sqrt(total / components))
    return stats
