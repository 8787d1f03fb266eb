"""Refinement layers with learnable envelopes (spec §3.3).

A gated message per edge (or angle) is weighted by a learned linear map of the
envelope-multiplied radial basis, so what the nodes receive vanishes smoothly at
the cutoff; feed-forward maps turn the sums into node and edge updates.
"""

from __future__ import annotations

import torch

from ..layers.mlp import MLP, GatedMLP, gather_sum
from ..layers.scatter import gather, segment_sum
from .topology import Topology


class AtomGraphRefinement(torch.nn.Module):
    """h_i ← FFN(Σ_{d: tgt=i} g_d ⊙ env_d) + w⊙h_i and e_u ← mean_{d∈u} FFN(g_d ⊙ env_d) + w⊙e_u."""

    def __init__(self, atom_dim: int, bond_dim: int, num_radial: int, norm: str, smoothed_edge_delta: bool):
        super().__init__()
        self.smoothed_edge_delta = smoothed_edge_delta
        self.edge_mlp = GatedMLP((bond_dim, atom_dim, atom_dim), atom_dim, bond_dim, norm)  # [e ‖ h_tgt ‖ h_src]
        self.node_ffn = MLP(bond_dim, [atom_dim], atom_dim, bias=False)
        self.edge_ffn = MLP(bond_dim, [bond_dim], bond_dim, bias=False)
        self.envelope = torch.nn.Linear(num_radial, bond_dim, bias=False)
        self.node_scale = torch.nn.Parameter(torch.ones(atom_dim))
        self.edge_scale = torch.nn.Parameter(torch.ones(bond_dim))

    def forward(
        self, h: torch.Tensor, e: torch.Tensor, rbf_pair: torch.Tensor, topo: Topology
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mlp = self.edge_mlp
        bond_part = mlp.project(0, e, bias=True)
        pre = gather_sum([(bond_part, topo.bond), (mlp.project(1, h), topo.centre), (mlp.project(2, h), topo.neighbor)])
        g = mlp.head(pre)  # (E, C_e)
        smooth = g * gather(self.envelope(rbf_pair), topo.bond)
        h_new = self.node_ffn(segment_sum(smooth, topo.centre)) + self.node_scale * h
        delta = self.edge_ffn(smooth if self.smoothed_edge_delta else g)
        e_new = 0.5 * segment_sum(delta, topo.bond) + self.edge_scale * e
        return h_new, e_new


class LineGraphRefinement(torch.nn.Module):
    """e_u ← FFN(Σ_{a: tgt=u} g_a ⊙ b_tgt ⊙ b_src) + w⊙e_u and t_a ← FFN(g_a) + w⊙t_a.

    g_a = GatedMLP([t_a ‖ h_centre ‖ e_tgt ‖ e_src]) and b = W_env rbf_3b per bond,
    so the angle weight vanishes when either bond reaches the three-body cutoff.
    """

    def __init__(self, atom_dim: int, bond_dim: int, angle_dim: int, num_radial: int, norm: str):
        super().__init__()
        self.edge_mlp = GatedMLP((angle_dim, atom_dim, bond_dim, bond_dim), bond_dim, angle_dim, norm)
        self.node_ffn = MLP(angle_dim, [bond_dim], bond_dim, bias=False)
        self.edge_ffn = MLP(angle_dim, [angle_dim], angle_dim, bias=False)
        self.envelope = torch.nn.Linear(num_radial, angle_dim, bias=False)
        self.node_scale = torch.nn.Parameter(torch.ones(bond_dim))
        self.edge_scale = torch.nn.Parameter(torch.ones(angle_dim))

    def forward(
        self, e: torch.Tensor, t: torch.Tensor, h: torch.Tensor, rbf_3b: torch.Tensor, topo: Topology
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mlp = self.edge_mlp
        # the centre atom and the target bond both follow from e₁: fold them per directed edge first
        centre_part = mlp.project(1, h, bias=True)
        per_edge = gather_sum([(centre_part, topo.centre), (mlp.project(2, e), topo.bond)])  # (E, 2H)
        pre = gather_sum([(per_edge, topo.angle_edge1), (mlp.project(3, e), topo.angle_source)])
        pre = pre.addmm_(t, mlp.part_weight(0).t())  # (A, 2H)
        g = mlp.head(pre)  # (A, C_t)
        b = self.envelope(rbf_3b)  # (B, C_t)
        # b_tgt is constant over each target's angles: apply it after the sum, per bond
        summed = b * segment_sum(g * gather(b, topo.angle_source), topo.angle_target)
        e_new = torch.addcmul(self.node_ffn(summed), self.node_scale, e)
        t_new = torch.addcmul(self.edge_ffn(g), self.edge_scale, t)
        return e_new, t_new
