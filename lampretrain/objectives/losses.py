"""Per-sample errors and masked per-dataset means; every reduction stays on the device (no host sync)."""

from __future__ import annotations

import torch

from ..models.layers.scatter import scatter_sum


def energy_per_atom_error(pred: torch.Tensor, target: torch.Tensor, n_atoms: torch.Tensor) -> torch.Tensor:
    """|E_pred − E| / N per graph, (G,)."""
    return (pred - target).abs() / n_atoms.to(pred.dtype)


def force_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖F_pred − F‖₂ per atom, (N,); its mean is the L2-norm MAE of MatRIS and DPA4."""
    return (pred - target).norm(dim=-1)


def stress_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean |Δσ| over the 9 components per graph, (G,)."""
    return (pred - target).abs().flatten(1).mean(dim=-1)


def magmom_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """|m_pred − m| per atom, (N,)."""
    return (pred - target).abs()


def masked_group_mean(
    values: torch.Tensor, mask: torch.Tensor, group: torch.Tensor, n_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``values`` over masked entries per group, and the entry counts, both (K,).

    Masked-out entries are selected away with ``where`` (not multiplied by 0), so a NaN
    or inf in an unlabelled slot cannot leak into the loss or its gradient.
    """
    picked = torch.where(mask, values, torch.zeros_like(values))
    total = scatter_sum(picked, group, n_groups)
    count = scatter_sum(mask.to(values.dtype), group, n_groups)
    return total / count.clamp(min=1), count
