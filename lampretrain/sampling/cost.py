"""Per-structure cost model for load balancing: cost = a·atoms + b·edges + c·angles.

Atom count alone mis-predicts step time: DPA4's work grows with edges and
MatRIS's with bond pairs (angles). ``lampretrain bench cost`` measures step
times of batches with known counts and :meth:`CostModel.fit` turns them into
coefficients that the recipe stores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CostModel:
    atoms: float = 1.0  # a, cost per atom
    edges: float = 0.0  # b, cost per directed edge
    angles: float = 0.0  # c, cost per ordered bond pair
    per_batch: float = 0.0  # fixed step overhead found by the fit; not part of a structure's cost

    def __post_init__(self) -> None:
        for name in ("atoms", "edges", "angles", "per_batch"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"cost coefficient '{name}' must be finite and >= 0, got {value}")
        if self.atoms == self.edges == self.angles == 0:
            raise ValueError("cost model needs at least one positive coefficient (atoms, edges, angles)")

    def __call__(self, natoms, n_edges=None, n_angles=None) -> np.ndarray:
        """Cost of each structure, float64 array shaped like ``natoms``."""
        cost = self.atoms * np.asarray(natoms, dtype=np.float64)
        for coef, counts, name in ((self.edges, n_edges, "edges"), (self.angles, n_angles, "angles")):
            if coef:
                if counts is None:
                    raise ValueError(f"cost model has a '{name}' coefficient but no {name} counts were given")
                cost = cost + coef * np.asarray(counts, dtype=np.float64)
        return cost

    @classmethod
    def fit(cls, natoms, n_edges, n_angles, seconds) -> "CostModel":
        """Non-negative least squares of step time = a·atoms + b·edges + c·angles + overhead over measured batches."""
        from scipy.optimize import nnls

        x = np.column_stack([natoms, n_edges, n_angles, np.ones(len(seconds))]).astype(np.float64)
        y = np.asarray(seconds, dtype=np.float64)
        if x.shape[0] < 4:
            raise ValueError(f"fitting the cost model needs at least 4 measured batches, got {x.shape[0]}")
        scale = np.where(x.max(axis=0) > 0, x.max(axis=0), 1.0)  # conditioning: counts span 1e2..1e7
        coef, _ = nnls(x / scale, y)
        a, b, c, overhead = coef / scale
        return cls(atoms=float(a), edges=float(b), angles=float(c), per_batch=float(overhead))
