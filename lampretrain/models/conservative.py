"""Conservative forces and stress by autograd of the energy.

F = −∂E/∂x and σ = (1/V) ∂E/∂ε (ASE sign, eV/Å³), with ε a symmetric strain
applied to positions and cell together (x ← x (1 + ε), L ← L (1 + ε)).
Training on F and σ needs the graph of these derivatives (double backward),
hence ``create_graph`` follows ``training``.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..graph.batch import GraphBatch

EnergyFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def strained(batch: GraphBatch, positions: torch.Tensor, cell: torch.Tensor, strain: torch.Tensor):
    """Positions and cells under the symmetrised per-graph strain ``strain`` (G, 3, 3)."""
    sym = 0.5 * (strain + strain.transpose(1, 2))
    positions = positions + torch.einsum("ni,nij->nj", positions, sym[batch.batch])
    cell = cell + torch.bmm(cell, sym)
    return positions, cell


def energy_forces_stress(
    energy_fn: EnergyFn,
    batch: GraphBatch,
    compute_forces: bool = True,
    compute_stress: bool = True,
    create_graph: bool = False,
) -> dict[str, torch.Tensor]:
    """Run ``energy_fn(positions, cell) -> (G,)`` and differentiate it.

    Stress is zero for graphs without a periodic cell (their volume is undefined).
    """
    positions = batch.positions
    cell = batch.cell
    inputs = []
    if compute_forces:
        positions = positions.detach().requires_grad_(True)
        inputs.append(positions)
    strain = None
    if compute_stress:
        strain = torch.zeros_like(cell, requires_grad=True)
        inputs.append(strain)
        positions, cell = strained(batch, positions, cell, strain)
    energy = energy_fn(positions, cell)
    out = {"energy": energy}
    if not inputs:
        return out
    grads = torch.autograd.grad(
        energy.sum(), inputs, create_graph=create_graph, allow_unused=True, materialize_grads=True
    )
    if compute_forces:
        out["forces"] = -grads[0]
    if compute_stress:
        volume = torch.linalg.det(batch.cell).abs()
        periodic = batch.pbc.any(dim=1) & (volume > 0)
        inv_volume = torch.where(periodic, 1.0 / torch.where(periodic, volume, torch.ones_like(volume)), 0.0)
        out["stress"] = grads[-1] * inv_volume[:, None, None]
    return out
