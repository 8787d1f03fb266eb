"""Validation on the store's val split: per-dataset energy, force and stress MAE, all ranks together.

The errors are those :mod:`lampretrain.inference.evaluate` reports, in eV units::

    energy: mean over labelled structures of |E_pred − E| / N      (eV/atom)
    forces: mean over labelled atoms and the 3 components of |ΔF|  (eV/Å)
    stress: mean over labelled structures and the 9 components of |Δσ|  (eV/Å³)

Each rank evaluates its share of the split (:func:`.data.build_val_loader`);
the summed absolute errors and value counts per (dataset, quantity) stay on
the device, and one all-reduce at the end turns them into MAEs over the whole
split, weighted by atoms and structures as above. With EMA on, the averaged
weights are evaluated. The model runs in eval mode, so the force derivative is
taken without ``create_graph`` and only with respect to positions and strain;
no parameter gets a gradient.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Mapping

import torch
import torch.distributed as dist

from ..graph.batch import GraphBatch
from ..models.layers.scatter import scatter_sum
from .ema import EMA
from .engines import Engine

QUANTITIES = ("energy", "forces", "stress")
COMPONENTS = (1, 3, 9)  # values per labelled structure (energy, stress) or atom (forces)


def _group_sums(values: torch.Tensor, mask: torch.Tensor, group: torch.Tensor, k: int, per: int) -> torch.Tensor:
    """(K, 2): Σ of ``values`` over masked entries per group, and the number of values (entries · ``per``)."""
    picked = torch.where(mask, values, torch.zeros_like(values))
    return torch.stack([scatter_sum(picked, group, k), scatter_sum(mask.to(values.dtype), group, k) * per], dim=-1)


def absolute_error_sums(out: Mapping[str, torch.Tensor], batch: GraphBatch, k: int) -> torch.Tensor:
    """(K, 3, 2) float64: per dataset and quantity (energy, forces, stress), Σ|error| and the number of values."""
    graph_ds = batch.dataset
    atom_ds = graph_ds[batch.batch]
    energy = (out["energy"].detach().double() - batch.energy.double()).abs() / batch.n_atoms.double()  # (G,)
    forces = (out["forces"].detach().double() - batch.forces.double()).abs().sum(dim=-1)  # (N,)
    stress = (out["stress"].detach().double() - batch.stress.double()).abs().flatten(1).sum(dim=-1)  # (G,)
    return torch.stack([
        _group_sums(energy, batch.energy_mask, graph_ds, k, COMPONENTS[0]),
        _group_sums(forces, batch.forces_mask, atom_ds, k, COMPONENTS[1]),
        _group_sums(stress, batch.stress_mask, graph_ds, k, COMPONENTS[2]),
    ], dim=1)


def maes(sums: torch.Tensor, names: list[str]) -> dict[str, float]:
    """``val/<dataset>/<quantity>_mae`` for every labelled (dataset, quantity), and ``val/<quantity>_mae`` over all."""
    values = sums.tolist()  # (K, 3, 2)
    out = {}
    for q, quantity in enumerate(QUANTITIES):
        for d, name in enumerate(names):
            err, count = values[d][q]
            if count > 0:
                out[f"val/{name}/{quantity}_mae"] = err / count
        err, count = sums[:, q].sum(dim=0).tolist()
        if count > 0:
            out[f"val/{quantity}_mae"] = err / count
    return out


def validate(
    engine: Engine, batches: Iterable[GraphBatch], names: list[str], ema: EMA | None, device: torch.device
) -> dict[str, float]:
    """Every rank calls this with its share of the val batches; all get the MAEs over the whole split."""
    sums = torch.zeros(len(names), len(QUANTITIES), 2, dtype=torch.float64, device=device)
    with ema.applied() if ema is not None else contextlib.nullcontext(), engine.evaluation() as model:
        for batch in batches:
            batch = batch.to(device, non_blocking=True)
            with torch.enable_grad():  # forces and stress are derivatives, even in evaluation
                out = model(batch, compute_forces=True, compute_stress=True)
            sums += absolute_error_sums(out, batch, len(names))
    dist.all_reduce(sums)
    return maes(sums.cpu(), names)
