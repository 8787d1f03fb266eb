"""Radius neighbor lists and three-body counts on numpy arrays (no torch).

Prep uses these to write edge and angle counts into the index; ``graph/``
builds the training tensors from the same lists, so the index and the
batches always agree.

Conventions: directed edges i→j for every j ≠ i (or periodic image of i)
with |x_j + S·cell − x_i| < cutoff; the edge vector is
``positions[j] + shift @ cell - positions[i]``. An angle is an ordered pair
of distinct directed edges sharing the centre atom i, both shorter than the
three-body cutoff (MatRIS counts both orders, so a centre with k short bonds
has k(k−1) angles).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import vesin


@dataclass
class NeighborList:
    """Directed edges, sorted by centre atom (then neighbor, then shift) unless built with sort=False."""

    i: np.ndarray  # (E,) int64 centre atom
    j: np.ndarray  # (E,) int64 neighbor atom
    shifts: np.ndarray  # (E, 3) int64 cell shift of the neighbor
    distances: np.ndarray  # (E,) float64

    @property
    def n_edges(self) -> int:
        return int(self.i.shape[0])


def _box(positions: np.ndarray, cell: np.ndarray | None, pbc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pbc = np.asarray(pbc, dtype=bool)
    if cell is None or not pbc.any():
        return np.zeros((3, 3)), np.zeros(3, dtype=bool)
    return np.asarray(cell, dtype=np.float64), pbc


def neighbor_list(
    positions: np.ndarray, cell: np.ndarray | None, pbc: np.ndarray, cutoff: float, sort: bool = True
) -> NeighborList:
    """All directed pairs within ``cutoff`` including periodic images (vesin).

    ``sort=False`` skips ordering the edges (counting does not need it, and the
    sort costs as much as the search on large cells).
    """
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    box, periodic = _box(positions, cell, pbc)
    if positions.shape[0] == 0:
        empty = np.zeros(0, dtype=np.int64)
        return NeighborList(empty, empty, np.zeros((0, 3), dtype=np.int64), np.zeros(0))
    calc = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    i, j, s, d = calc.compute(points=positions, box=box, periodic=periodic, quantities="ijSd")
    i = i.astype(np.int64)
    j = j.astype(np.int64)
    s = s.astype(np.int64)
    if not sort:
        return NeighborList(i, j, s, d)
    order = np.lexsort((s[:, 2], s[:, 1], s[:, 0], j, i))
    return NeighborList(i[order], j[order], s[order], d[order])


def angles_per_atom(nl: NeighborList, n_atoms: int, three_body_cutoff: float) -> np.ndarray:
    """Number of ordered bond pairs (angles) centred on each atom, (N,) int64."""
    k = np.bincount(nl.i[nl.distances < three_body_cutoff], minlength=n_atoms).astype(np.int64)
    return k * (k - 1)


def graph_counts(nl: NeighborList, n_atoms: int, cutoff: float, three_body_cutoff: float) -> tuple[int, int]:
    """(directed edges within ``cutoff``, angles within ``three_body_cutoff``) from a list built at
    ``max(cutoff, three_body_cutoff)`` or more."""
    n_edges = int((nl.distances < cutoff).sum())
    n_angles = int(angles_per_atom(nl, n_atoms, three_body_cutoff).sum())
    return n_edges, n_angles
