"""One MatRIS interaction block: line-graph attention → atom-graph attention → line-graph refinement → atom-graph refinement."""

from __future__ import annotations

import torch

from ..layers.recompute import recompute
from .attention import AtomGraphAttention, LineGraphAttention
from .config import MatRISConfig
from .refinement import AtomGraphRefinement, LineGraphRefinement
from .topology import Topology


class InteractionBlock(torch.nn.Module):
    """Updates atoms h, bonds e and angles t (spec §3.1).

    The line-graph layers always run, also for a batch without angles (bonds then
    get their node update from zero aggregates): a structure's output must not
    depend on what else is in its batch. The official code skips them when the
    whole batch has no angle.
    """

    def __init__(self, cfg: MatRISConfig):
        super().__init__()
        a, b, t = cfg.atom_dim, cfg.bond_dim, cfg.angle_dim
        self.line_attention = LineGraphAttention(b, t, b, cfg.norm)
        self.atom_attention = AtomGraphAttention(a, b, a, cfg.norm)
        self.line_refinement = LineGraphRefinement(a, b, t, cfg.num_radial, cfg.norm)
        self.atom_refinement = AtomGraphRefinement(a, b, cfg.num_radial, cfg.norm, cfg.smoothed_edge_delta)

    def forward(
        self,
        h: torch.Tensor,
        e: torch.Tensor,
        t: torch.Tensor,
        rbf_pair: torch.Tensor,
        rbf_3b: torch.Tensor,
        topo: Topology,
        recompute_line_graph: bool = False,
        edge_weight: torch.Tensor | None = None,
        angle_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``edge_weight`` (E,) and ``angle_weight`` (A,): the attention envelopes of a smooth model, else None."""

        def line(layer, *inputs, weight=None):
            # keep only the layer inputs alive, also through the force graph (see layers/recompute.py)
            if recompute_line_graph:
                n = len(inputs)
                tensors = inputs if weight is None else (*inputs, weight)  # the weight depends on positions too
                return recompute(lambda *x: layer(*x[:n], topo, *x[n:]), tensors, list(layer.parameters()))
            return layer(*inputs, topo) if weight is None else layer(*inputs, topo, weight)

        e, t = line(self.line_attention, e, t, weight=angle_weight)
        h, e = self.atom_attention(h, e, topo, edge_weight)
        e, t = line(self.line_refinement, e, t, h, rbf_3b)
        h, e = self.atom_refinement(h, e, rbf_pair, topo)
        return h, e, t
