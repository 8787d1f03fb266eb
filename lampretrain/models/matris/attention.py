"""Separable, dimension-wise graph attention (spec §3.2).

Each edge d (target ← source) carries a message m_d and two logit vectors from
its own feature; per channel, a softmax over the edges sharing a source and one
over the edges sharing a target weight the messages summed into each node.
There is no query·key product, so the cost is linear in the number of edges.
"""

from __future__ import annotations

import torch

from ..layers.mlp import GatedMLP, gather_sum
from ..layers.scatter import scatter_max, scatter_sum
from .topology import Topology


def separable_aggregate(
    message: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, source: torch.Tensor, num_nodes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """a^t_n = Σ_{tgt(d)=n} α^t_d ⊙ m_d and a^s_n = Σ_{src(d)=n} α^s_d ⊙ m_d.

    ``logits`` (D, 2C) holds the source logits then the target logits; α^s and α^t
    are per-channel segment softmaxes over sources and targets (spec §3.2 steps 3–4).
    The softmax denominator is applied per node, Σ_d exp(s_d − max) m_d / Σ_d exp(s_d − max),
    which keeps one (D, C) tensor per softmax instead of three.
    """
    source_logits, target_logits = logits.split(message.shape[1], dim=-1)

    def aggregate(s: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        z = torch.exp(s - scatter_max(s, index, num_nodes).index_select(0, index))  # (D, C)
        denom = scatter_sum(z, index, num_nodes)  # (n, C); 0 only where no edge arrives
        total = scatter_sum(z * message, index, num_nodes)
        return total / torch.where(denom > 0, denom, torch.ones_like(denom))

    return aggregate(target_logits, target), aggregate(source_logits, source)


class SeparableAttention(torch.nn.Module):
    """Parameters of one attention layer on a graph with node width ``node_dim`` and edge width ``edge_dim``."""

    def __init__(self, node_dim: int, edge_dim: int, hidden: int, norm: str):
        super().__init__()
        self.edge_mlp = GatedMLP((edge_dim, node_dim, node_dim), hidden, edge_dim, norm)  # [y_d ‖ x_tgt ‖ x_src]
        self.node_mlp = GatedMLP((node_dim, edge_dim, edge_dim), hidden, node_dim, norm)  # [x_n ‖ a^t ‖ a^s]
        self.logits = torch.nn.Linear(edge_dim, 2 * edge_dim, bias=False)  # rows: W_s then W_t
        self.node_scale = torch.nn.Parameter(torch.ones(node_dim))
        self.edge_scale = torch.nn.Parameter(torch.ones(edge_dim))


class AtomGraphAttention(SeparableAttention):
    """Updates atoms h from bonds e over directed edges; bonds take the mean of both directions' messages."""

    def forward(self, h: torch.Tensor, e: torch.Tensor, topo: Topology) -> tuple[torch.Tensor, torch.Tensor]:
        mlp = self.edge_mlp
        pre = gather_sum(
            [(mlp.project(0, e), topo.bond), (mlp.project(1, h), topo.centre), (mlp.project(2, h), topo.neighbor)]
        )  # (E, 2H)
        message = mlp.head(pre)  # (E, C_e)
        logits = self.logits(e).index_select(0, topo.bond)  # (E, 2 C_e)
        a_t, a_s = separable_aggregate(message, logits, topo.centre, topo.neighbor, topo.num_atoms)
        h_new = self.node_mlp(h, a_t, a_s) + self.node_scale * h
        e_new = 0.5 * scatter_sum(message, topo.bond, topo.num_bonds) + self.edge_scale * e
        return h_new, e_new


class LineGraphAttention(SeparableAttention):
    """Updates bonds e from angles t (target bond(e₁) ← source bond(e₂)); angles keep their messages."""

    def forward(self, e: torch.Tensor, t: torch.Tensor, topo: Topology) -> tuple[torch.Tensor, torch.Tensor]:
        mlp = self.edge_mlp
        # one product of t with [W_t-part of the message MLP; W_s; W_t]; per-bond projections are gathered
        weight = torch.cat([mlp.part_weight(0), self.logits.weight])  # (2H + 2C_t, C_t)
        own, logits = (t @ weight.t()).split([weight.shape[0] - 2 * t.shape[1], 2 * t.shape[1]], dim=-1)
        pre = gather_sum([(own, None), (mlp.project(1, e), topo.angle_target), (mlp.project(2, e), topo.angle_source)])
        message = mlp.head(pre)  # (A, C_t)
        a_t, a_s = separable_aggregate(message, logits, topo.angle_target, topo.angle_source, topo.num_bonds)
        e_new = self.node_mlp(e, a_t, a_s) + self.node_scale * e
        t_new = torch.addcmul(message, self.edge_scale, t)
        return e_new, t_new
