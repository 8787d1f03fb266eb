"""Error metrics of predictions against labels, each defined once and named by its definition.

A metric is the mean over labelled samples (structures or atoms) of a per-sample error e_s,
itself a mean over the sample's values, with a square root for the RMSE variants::

    energy_per_atom_mae    mean_g |E'_g − E_g| / N_g                            eV/atom
    energy_per_atom_rmse   sqrt(mean_g ((E'_g − E_g) / N_g)²)                   eV/atom
    force_component_mae    mean over atoms i and c ∈ {x, y, z} of |F'_ic − F_ic|  eV/Å
    force_component_rmse   sqrt(mean_ic (F'_ic − F_ic)²)                        eV/Å
    force_norm_mae         mean_i ‖F'_i − F_i‖₂                                 eV/Å
    stress_component_mae   mean over structures and the 9 components of |Δσ|    eV/Å³
    stress_component_rmse  sqrt(mean_g,ab Δσ_ab²)                               eV/Å³
    magmom_mae             mean_i |m'_i − m_i|                                  μB
    magmom_rmse            sqrt(mean_i (m'_i − m_i)²)                           μB

``force_component_mae`` is the "force MAE" of fairchem, MACE and deepmd-kit's ``dp test``;
``force_norm_mae`` is the MatRIS/DPA4 force loss. 3‖x‖₂/‖x‖₁ lies in [√3, 3], so the norm MAE
is √3 to 3 times the component MAE (2 for isotropic Gaussian errors).

Reductions stay on the device (no host sync) and keep the autograd graph, so the loss uses
the same definitions. Unlabelled samples are selected away with ``where``, not multiplied
by 0, so a NaN or inf in an unlabelled slot cannot reach a metric or a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..models.layers.scatter import scatter_sum


def _per_sample_mean(values: torch.Tensor) -> torch.Tensor:
    """(S, ...) → (S,): mean over each sample's values (a (S,) input is already one value per sample)."""
    return values.flatten(1).mean(dim=-1) if values.dim() > 1 else values


def absolute_error(diff: torch.Tensor) -> torch.Tensor:
    """e_s = mean over the sample's values of |Δ|; ``diff`` (S, ...) → (S,)."""
    return _per_sample_mean(diff.abs())


def squared_error(diff: torch.Tensor) -> torch.Tensor:
    """e_s = mean over the sample's values of Δ²; ``diff`` (S, ...) → (S,)."""
    return _per_sample_mean(diff.square())


def norm_error(diff: torch.Tensor) -> torch.Tensor:
    """e_s = ‖Δ_s‖₂ of a vector per sample; ``diff`` (S, 3) → (S,)."""
    return diff.norm(dim=-1)


def masked_group_sums(values: torch.Tensor, mask: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(K, 2): Σ of ``values`` (S,) over the masked samples of each group, and the number of those samples."""
    picked = torch.where(mask, values, torch.zeros_like(values))
    return torch.stack([scatter_sum(picked, group, n_groups), scatter_sum(mask.to(values.dtype), group, n_groups)], -1)


@dataclass(frozen=True)
class Metric:
    """mean over labelled samples of ``error``(Δ) (square-rooted when ``root``), Δ = prediction − label."""

    name: str
    label: str  # the label it needs: energy | forces | stress | magmoms
    error: Callable[[torch.Tensor], torch.Tensor]  # Δ (S, ...) → per-sample error (S,)
    per_atom: bool = False  # Δ divided by the structure's atom count first (energies)
    root: bool = False  # RMSE: sqrt of the mean squared error

    def sample_errors(self, pred: torch.Tensor, target: torch.Tensor, n_atoms: torch.Tensor | None = None) -> torch.Tensor:
        """(S,) e_s of every sample, labelled or not."""
        diff = pred - target
        if self.per_atom:
            diff = diff / n_atoms.to(diff.dtype)
        return self.error(diff)

    def sums(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, group: torch.Tensor, n_groups: int,
             n_atoms: torch.Tensor | None = None) -> torch.Tensor:
        """(K, 2): Σ e_s over the labelled samples of each group and their number; sums add up over batches and ranks."""
        return masked_group_sums(self.sample_errors(pred, target, n_atoms), mask, group, n_groups)

    def finish(self, sums: torch.Tensor) -> torch.Tensor:
        """(..., 2) sums → (...) metric values; 0 where no sample is labelled."""
        mean = sums[..., 0] / sums[..., 1].clamp(min=1)
        return mean.sqrt() if self.root else mean

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                 n_atoms: torch.Tensor | None = None) -> torch.Tensor:
        """The metric over all labelled samples (every sample when ``mask`` is None), a scalar."""
        if mask is None:
            mask = torch.ones(pred.shape[0], dtype=torch.bool, device=pred.device)
        group = torch.zeros(pred.shape[0], dtype=torch.long, device=pred.device)
        return self.finish(self.sums(pred, target, mask, group, 1, n_atoms))[0]


energy_per_atom_mae = Metric("energy_per_atom_mae", "energy", absolute_error, per_atom=True)
energy_per_atom_rmse = Metric("energy_per_atom_rmse", "energy", squared_error, per_atom=True, root=True)
force_component_mae = Metric("force_component_mae", "forces", absolute_error)
force_component_rmse = Metric("force_component_rmse", "forces", squared_error, root=True)
force_norm_mae = Metric("force_norm_mae", "forces", norm_error)
stress_component_mae = Metric("stress_component_mae", "stress", absolute_error)
stress_component_rmse = Metric("stress_component_rmse", "stress", squared_error, root=True)
magmom_mae = Metric("magmom_mae", "magmoms", absolute_error)
magmom_rmse = Metric("magmom_rmse", "magmoms", squared_error, root=True)

METRICS = {m.name: m for m in (
    energy_per_atom_mae, energy_per_atom_rmse, force_component_mae, force_component_rmse, force_norm_mae,
    stress_component_mae, stress_component_rmse, magmom_mae, magmom_rmse,
)}
