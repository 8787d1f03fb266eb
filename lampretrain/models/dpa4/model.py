"""The DPA4 backbone with a scalar energy readout: E = Σ_i ε_i, F = −∂E/∂x, σ = (1/V) ∂E/∂ε."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ...graph.batch import GraphBatch, edge_vectors
from ..conservative import energy_forces_stress
from ..layers.scatter import scatter_sum
from .block import InteractionBlock
from .config import DPA4Config
from .embedding import EnvironmentSeed, RadialMLP, geometric_embedding
from .geometry import EdgeGeometry
from .readout import EnergyReadout


class DPA4(nn.Module):
    def __init__(self, cfg: DPA4Config):
        super().__init__()
        self.config = cfg
        c = cfg.channels
        self.geometry = EdgeGeometry(cfg)
        self.type_embedding = nn.Embedding(cfg.n_elements, c)
        nn.init.normal_(self.type_embedding.weight, std=(cfg.n_elements + c) ** -0.5)
        self.radial = RadialMLP(cfg)
        self.env_seed = EnvironmentSeed(cfg) if cfg.env_seed else None
        self.blocks = nn.ModuleList(InteractionBlock(cfg) for _ in range(cfg.n_blocks))
        self.readout = EnergyReadout(c, cfg.ffn_channels, cfg.n_elements)

    def species(self, batch: GraphBatch) -> torch.Tensor:
        """Element index Z − 1 of every atom."""
        return batch.numbers - 1

    def node_features(self, batch: GraphBatch, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """Equivariant node features (N, (L+1)², C) after the last block; degree l ≥ 1 turns with D^l."""
        cfg = self.config
        species = self.species(batch)
        n = positions.shape[0]
        geo = self.geometry(
            edge_vectors(positions, cell, batch), batch.edge_index, n, roll=self.training and cfg.random_roll
        )
        radial = self.radial(geo)  # (E, L+1, C)
        t = self.type_embedding(species)  # (N, C)
        scalar = self.env_seed(t, species, geo) if self.env_seed is not None else t
        x = torch.cat([scalar[:, None], geometric_embedding(radial, geo, cfg.lmax)[:, 1:]], dim=1)  # (N, D, C)
        radial = radial + (t[geo.dst] + t[geo.src])[:, None]
        autocast = (
            torch.autocast(positions.device.type, dtype=torch.bfloat16)
            if cfg.autocast_bf16
            else contextlib.nullcontext()
        )
        with autocast:
            for block in self.blocks:
                x = block(x, geo, radial)
        return x.to(positions.dtype)

    def energy(self, batch: GraphBatch, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """Total energy per graph (G,)."""
        x = self.node_features(batch, positions, cell)
        atomic = self.readout(x[:, 0], self.species(batch))
        return scatter_sum(atomic, batch.batch, batch.n_atoms.shape[0])

    def forward(
        self, batch: GraphBatch, compute_forces: bool = True, compute_stress: bool = True
    ) -> dict[str, torch.Tensor]:
        """energy (G,), forces (N, 3), stress (G, 3, 3); differentiable (create_graph) in training mode."""
        if batch.numbers.numel() and (int(batch.numbers.min()) < 1 or int(batch.numbers.max()) > self.config.n_elements):
            raise ValueError(
                f"DPA4: atomic numbers must lie in 1..{self.config.n_elements}, "
                f"got {int(batch.numbers.min())}..{int(batch.numbers.max())}"
            )
        return energy_forces_stress(
            lambda positions, cell: self.energy(batch, positions, cell),
            batch,
            compute_forces=compute_forces,
            compute_stress=compute_stress,
            create_graph=self.training,
        )
