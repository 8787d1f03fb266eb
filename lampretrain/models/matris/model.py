"""The MatRIS backbone: embeddings, interaction blocks, the readout norm."""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ...graph.batch import GraphBatch, edge_vectors
from ..backbone import NodeFeatures
from ..layers.norms import make_norm
from ..layers.scatter import gather
from .block import InteractionBlock
from .config import MatRISConfig
from .embedding import AngleEmbedding, AtomEmbedding, BondEmbedding
from .topology import Topology, topology


def attention_weights(
    env_pair: torch.Tensor, env_3b: torch.Tensor, topo: Topology
) -> tuple[torch.Tensor, torch.Tensor]:
    """Envelopes of the smooth attentions: w_d = u(r_bond(d) / r_c) per directed edge (E,) and
    w_a = u(r_tgt / r_3b) · u(r_src / r_3b) per angle (A,), which vanishes as either of its bonds
    reaches the three-body cutoff. Bond envelopes (B,) in."""
    return gather(env_pair, topo.bond), gather(env_3b, topo.angle_target) * gather(env_3b, topo.angle_source)


class MatRIS(torch.nn.Module):
    """Invariant three-body attention backbone (a :class:`~lampretrain.models.backbone.Backbone`).

    The released model's energy head MLP(LN(h_i)) and magmom head |MLP(LN(h_i))| are the multi-task
    model's heads at ``default_heads`` (its energy is extensive; the official model divides by N and adds
    the reference per atom, which is the same energy per atom).
    """

    vector_channels = 0
    # single-task heads and references of checkpoints written before the multi-task heads took their place
    retired_keys = ("energy_head", "magmom_head", "atom_ref")

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

    @property
    def cutoff(self) -> float:
        return self.config.cutoff

    @property
    def three_body_cutoff(self) -> float:
        return self.config.three_body_cutoff

    @property
    def node_channels(self) -> int:
        return self.config.atom_dim

    @property
    def default_heads(self) -> dict:
        return {"hidden": self.config.readout_hidden, "magmoms": True, "vector_hidden": self.config.magmom_hidden}

    def layers(self) -> list[torch.nn.Module]:
        embeddings = torch.nn.ModuleList([self.atom_embedding, self.bond_embedding, self.angle_embedding])
        return [embeddings, *self.blocks]

    def node_features(self, batch: GraphBatch, positions: torch.Tensor, cell: torch.Tensor) -> NodeFeatures:
        """Normalised atom features LN(h) after the last block, (N, atom_dim); no vector features."""
        topo = topology(batch)
        vec = edge_vectors(positions, cell, batch)  # (E, 3)
        length = vec.norm(dim=-1)  # (E,)
        unit = vec / length[:, None]
        e1, e2 = batch.angle_index
        h = self.atom_embedding(batch.numbers)  # (N, C_a)
        bases = self.bond_embedding(length[topo.bond_edge])
        e = bases.feature  # (B, C_b)
        t = self.angle_embedding(unit[e1], unit[e2])  # (A, C_t)
        edge_weight = angle_weight = None
        if self.config.smooth:
            edge_weight, angle_weight = attention_weights(bases.env_pair, bases.env_3b, topo)
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
            h, e, t = block(h, e, t, bases.rbf_pair, bases.rbf_3b, topo, recompute, edge_weight, angle_weight)
        return NodeFeatures(self.readout_norm(h), None)
