"""Separable, dimension-wise graph attention (spec §3.2).

Each edge d (target ← source) carries a message m_d and two logit vectors from
its own feature; per channel, a softmax over the edges sharing a source and one
over the edges sharing a target weight the messages summed into each node.
There is no query·key product, so the cost is linear in the number of edges.

Published, an edge's share exp(s_d)/Σ exp(s) and its message m_d are O(1) whatever its
length, so the sums jump when a neighbour crosses the cutoff (an angle, the three-body
cutoff). The smooth variant weights both by the edge's envelope w_d (see
:func:`separable_aggregate`), which vanishes with its first derivatives there.
"""

from __future__ import annotations

import torch

from ..layers.mlp import GatedMLP, gather_sum
from ..layers.scatter import Segments, gather, segment_max, segment_sum
from .topology import Topology


def separable_aggregate(
    message: torch.Tensor,
    source_logits: torch.Tensor,
    target_logits: torch.Tensor,
    target: Segments,
    source: Segments,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """a^t_n = Σ_{tgt(d)=n} α^t_d ⊙ m_d and a^s_n = Σ_{src(d)=n} α^s_d ⊙ m_d.

    α^s and α^t are per-channel segment softmaxes of the (D, C) logits over sources and
    targets (spec §3.2 steps 3–4); contiguous logits keep the segment max on its fast path.
    The softmax denominator is applied per node, Σ_d exp(s_d − max) m_d / Σ_d exp(s_d − max),
    which keeps one (D, C) tensor per softmax instead of three.

    With envelope weights w (D,) (smooth MatRIS): a_n = Σ_d w_d e^{s_d} · w_d m_d / Σ_d w_d e^{s_d}.
    An edge's share and its message both vanish with w_d, so a_n is C¹ as an edge leaves
    (also the last edge of a node: then a_n = w_d m_d → 0); the shares' derivatives stay
    bounded by the logit spread, as every one of them carries a w in its numerator.
    """
    if weight is not None:
        message = message * weight[:, None]

    def aggregate(s: torch.Tensor, nodes: Segments) -> torch.Tensor:
        shift = segment_max(s, nodes).index_select(0, nodes.index)  # (D, C), no gradient
        z = (s - shift).exp_()  # (D, C)
        if weight is not None:
            z = z * weight[:, None]
        denom = segment_sum(z, nodes)  # (n, C); 0 only where no edge arrives (or every weight is 0)
        total = segment_sum(z * message, nodes)
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

    def forward(
        self, h: torch.Tensor, e: torch.Tensor, topo: Topology, weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``weight``: (E,) envelope of each directed edge's bond (smooth), None (published)."""
        mlp = self.edge_mlp
        bond_part = mlp.project(0, e, bias=True)
        pre = gather_sum([(bond_part, topo.bond), (mlp.project(1, h), topo.centre), (mlp.project(2, h), topo.neighbor)])
        message = mlp.head(pre)  # (E, C_e)
        source_logits, target_logits = self.logits(e).split(message.shape[1], dim=-1)  # (B, C_e) each
        a_t, a_s = separable_aggregate(
            message, gather(source_logits, topo.bond), gather(target_logits, topo.bond), topo.centre, topo.neighbor,
            weight,
        )
        h_new = self.node_mlp(h, a_t, a_s) + self.node_scale * h
        e_new = 0.5 * segment_sum(message, topo.bond) + self.edge_scale * e
        return h_new, e_new


class LineGraphAttention(SeparableAttention):
    """Updates bonds e from angles t (target bond(e₁) ← source bond(e₂)); angles keep their messages."""

    def forward(
        self, e: torch.Tensor, t: torch.Tensor, topo: Topology, weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``weight``: (A,) product of both bonds' three-body envelopes (smooth), None (published)."""
        mlp = self.edge_mlp
        target_part = mlp.project(1, e, bias=True)
        pre = gather_sum([(target_part, topo.angle_target), (mlp.project(2, e), topo.angle_source)])
        pre = pre.addmm_(t, mlp.part_weight(0).t())  # (A, 2H): the angle's own part accumulates in the product
        message = mlp.head(pre)  # (A, C_t)
        w_s, w_t = self.logits.weight.split(t.shape[1])
        a_t, a_s = separable_aggregate(
            message, t @ w_s.t(), t @ w_t.t(), topo.angle_target, topo.angle_source, weight
        )
        e_new = self.node_mlp(e, a_t, a_s) + self.node_scale * e
        t_new = torch.addcmul(message, self.edge_scale, t)
        return e_new, t_new
