"""DeNS position corruption (Liao et al., "Generalizing denoising to non-equilibrium structures", 2024).

A fraction ``prob`` of the structures in a training batch is corrupted: each of their
atoms is picked with probability ``corrupt_ratio`` and displaced by ε ~ N(0, σ²I).
The model sees the noisy structure, σ and (for atoms whose frame has force labels)
the original forces as an input encoding, and predicts ε/σ. Defaults are deepmd-kit's
DPA4 ``dens`` loss values: prob 0.5, std 0.025 Å, corrupt ratio 0.5 (the loss
coefficient 10 lives in ``ObjectiveConfig.denoising_weight``). Edges are not rebuilt:
at σ = 0.025 Å only pairs within a few σ of the cutoff change status, and there
every envelope is ≈ 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...graph.batch import GraphBatch
from ..layers.scatter import scatter_sum


@dataclass(frozen=True)
class DenoisingConfig:
    enabled: bool = False
    prob: float = 0.5  # fraction of structures corrupted per batch
    std: float = 0.025  # σ of the Gaussian position noise, Å
    corrupt_ratio: float = 0.5  # fraction of atoms displaced inside a corrupted structure
    encode_forces: bool = True  # feed the original forces of displaced atoms to the denoising head

    def __post_init__(self) -> None:
        for key in ("prob", "corrupt_ratio"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{key}: must lie in [0, 1], got {value}")
        if not self.std > 0:
            raise ValueError(f"std: must be > 0 Å, got {self.std}")


@dataclass
class Corruption:
    """What was done to a batch: the noise and where it went."""

    noise: torch.Tensor  # (N, 3) Å, zero on untouched atoms
    sigma: torch.Tensor  # (N,) Å, σ on displaced atoms, 0 elsewhere
    displaced: torch.Tensor  # (N,) bool
    noisy: torch.Tensor  # (G,) bool, graphs with at least one displaced atom

    @property
    def target(self) -> torch.Tensor:
        """ε/σ on displaced atoms, 0 elsewhere, (N, 3)."""
        return self.noise / torch.where(self.displaced, self.sigma, torch.ones_like(self.sigma))[:, None]


def sample_corruption(batch: GraphBatch, config: DenoisingConfig, generator: torch.Generator | None = None) -> Corruption:
    """Draw which graphs and atoms get noise and the noise itself, on the batch's device (no host sync)."""
    pos = batch.positions
    pick_graph = torch.rand(batch.n_atoms.shape[0], device=pos.device, generator=generator) < config.prob
    pick_atom = torch.rand(pos.shape[0], device=pos.device, generator=generator) < config.corrupt_ratio
    displaced = pick_graph[batch.batch] & pick_atom
    sigma = torch.where(displaced, config.std, 0.0).to(pos.dtype)
    noise = torch.randn(pos.shape, device=pos.device, dtype=pos.dtype, generator=generator) * sigma[:, None]
    noisy = scatter_sum(displaced.to(torch.int32), batch.batch, batch.n_atoms.shape[0]) > 0
    return Corruption(noise=noise, sigma=sigma, displaced=displaced, noisy=noisy)
