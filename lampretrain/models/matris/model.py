"""The MatRIS model: embeddings, interaction blocks, readout and conservative forces/stress."""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ...graph.batch import GraphBatch, edge_vectors
from ..conservative import energy_forces_stress
from ..layers.mlp import MLP
from ..layers.norms import make_norm
from ..layers.scatter import scatter_sum
from .block import InteractionBlock
from .config import MatRISConfig
from .embedding import AngleEmbedding, AtomEmbedding, BondEmbedding
from .topology import topology


class MatRIS(torch.nn.Module):
    """Invariant three-body attention backbone with an energy head, a magmom head and element references.

    E_g = Σ_{i∈g} [MLP(LN(h_i)) + ref(Z_i)] (extensive; the official model divides by N
    and adds the reference per atom, which is the same energy per atom);
    m_i = |MLP(LN(h_i))|. ``atom_ref`` is frozen: the trainer fits it to data.
    """

    def __init__(self, config: MatRISConfig | None = None):
        super().__init__()
        cfg = config or MatRISConfig()
        self.config = cfg
        self.atom_embedding = AtomEmbedding(cfg.num_elements, cfg.atom_dim)
        self.bond_embedding = BondEmbedding(
            cfg.num_radial, cfg.bond_dim, cfg.cutoff, cfg.three_body_cutoff, cfg.envelope_exponent, cfg.norm
        )
        self.angle_embedding = AngleEmbedding(cfg.num_angular, cfg.angle_dim)
        self.blocks = torch.nn.ModuleList(InteractionBlock(cfg) for _ in range(cfg.num_layers))
        self.readout_norm = make_norm(cfg.norm, cfg.atom_dim)
        self.energy_head = MLP(cfg.atom_dim, cfg.readout_hidden, 1)
        self.magmom_head = MLP(cfg.atom_dim, [cfg.magmom_hidden], 1)
        self.atom_ref = torch.nn.Parameter(torch.zeros(cfg.num_elements), requires_grad=False)

    def node_features(self, batch: GraphBatch, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """Normalised atom features LN(h) after the last block, (N, atom_dim)."""
        topo = topology(batch)
        vec = edge_vectors(positions, cell, batch)  # (E, 3)
        length = vec.norm(dim=-1)  # (E,)
        unit = vec / length[:, None]
        e1, e2 = batch.angle_index
        h = self.atom_embedding(batch.numbers)  # (N, C_a)
        e, rbf_pair, rbf_3b = self.bond_embedding(length[topo.bond_edge])  # (B, C_b), (B, R), (B, R)
        t = self.angle_embedding(unit[e1], unit[e2])  # (A, C_t)
        limit = self.config.checkpoint_angles
        # training only: inference keeps its single-backward force graph, recomputing would cost time for memory
        # it can spare. Under symbolic tracing (export) the angle count is a free symbol: branching on it would
        # fix its range, so a traced program never recomputes; eager sizes are ints and compare as usual
        recompute = (
            limit is not None
            and self.training
            and torch.is_grad_enabled()
            and statically_known_true(topo.num_angles > limit)
        )
        for block in self.blocks:
            h, e, t = block(h, e, t, rbf_pair, rbf_3b, topo, recompute)
        return self.readout_norm(h)

    def atom_energies(self, batch: GraphBatch, features: torch.Tensor) -> torch.Tensor:
        """Per-atom energies (N,) from node features, element reference included."""
        return self.energy_head(features).squeeze(-1) + self.atom_ref[batch.numbers - 1]

    def energy(self, batch: GraphBatch, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """Total energy per graph (G,) in eV."""
        features = self.node_features(batch, positions, cell)
        return scatter_sum(self.atom_energies(batch, features), batch.batch, batch.num_graphs)

    def forward(
        self, batch: GraphBatch, compute_forces: bool = True, compute_stress: bool = True
    ) -> dict[str, torch.Tensor]:
        """energy (G,), forces (N, 3), stress (G, 3, 3) ASE sign, magmoms (N,)."""
        features: list[torch.Tensor] = []

        def energy_fn(positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
            x = self.node_features(batch, positions, cell)
            features.append(x)
            return scatter_sum(self.atom_energies(batch, x), batch.batch, batch.num_graphs)

        out = energy_forces_stress(
            energy_fn, batch, compute_forces, compute_stress, create_graph=self.training
        )
        out["magmoms"] = self.magmom_head(features[0]).squeeze(-1).abs()
        return out
