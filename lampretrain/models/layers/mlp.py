"""Feed-forward blocks: a plain MLP and a gated MLP whose first layer can act part by part.

The gated MLP's first layer multiplies a concatenation [x₁‖x₂‖…]; that product
equals Σ_k W_k x_k. Graph layers use this to project node features once per node
and gather the projections per edge or angle, instead of concatenating per edge.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .norms import make_norm
from .scatter import Segments, gather


class MLP(torch.nn.Module):
    """Linear → SiLU → … → Linear with the given hidden widths."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, bias: bool = True):
        super().__init__()
        dims = [in_dim, *hidden, out_dim]
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(a, b, bias=bias) for a, b in zip(dims[:-1], dims[1:])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, layer in enumerate(self.layers):
            if k:
                x = F.silu(x)
            x = layer(x)
        return x


class GatedMLP(torch.nn.Module):
    """y = SiLU(N_c(W_c2 SiLU(W_c1 x))) ⊙ σ(N_g(W_g2 SiLU(W_g1 x))), x = [x₁‖x₂‖…].

    ``first`` stacks W_c1 over W_g1 (core rows, then gate rows) so one product
    serves both branches; the parameter count equals two separate MLPs.
    """

    def __init__(self, part_dims: Sequence[int], hidden: int, out_dim: int, norm: str = "layer"):
        super().__init__()
        self.part_dims = tuple(part_dims)
        self.offsets = tuple(sum(self.part_dims[:k]) for k in range(len(self.part_dims)))
        self.hidden = hidden
        self.first = torch.nn.Linear(sum(self.part_dims), 2 * hidden)
        self.core_out = torch.nn.Linear(hidden, out_dim)
        self.gate_out = torch.nn.Linear(hidden, out_dim)
        self.core_norm = make_norm(norm, out_dim)
        self.gate_norm = make_norm(norm, out_dim)

    def part_weight(self, part: int) -> torch.Tensor:
        """The first layer's columns acting on input part ``part``, (2·hidden, d_k)."""
        start = self.offsets[part]
        return self.first.weight[:, start : start + self.part_dims[part]]

    def project(self, part: int, x: torch.Tensor, bias: bool = False) -> torch.Tensor:
        """W_k x_k (+ b with ``bias``) for input part ``part``: (M, d_k) → (M, 2·hidden).

        The first layer's bias belongs in exactly one of the summed parts; callers put it
        on a per-node part, so that it is added once per node instead of once per edge.
        """
        return F.linear(x, self.part_weight(part), self.first.bias if bias else None)

    def head(self, pre: torch.Tensor) -> torch.Tensor:
        """Everything after the first layer: (M, 2·hidden) summed projections, bias included → (M, out)."""
        # split, not slicing: its backward is one concatenation instead of two zero-filled copies
        z_core, z_gate = F.silu(pre).split(self.hidden, dim=-1)
        core = self.core_norm(F.linear(z_core, self.core_out.weight, self.core_out.bias))
        gate = self.gate_norm(F.linear(z_gate, self.gate_out.weight, self.gate_out.bias))
        return F.silu(core) * torch.sigmoid(gate)

    def forward(self, *parts: torch.Tensor) -> torch.Tensor:
        """The MLP of the concatenated parts (all with the same leading size)."""
        return self.head(self.first(torch.cat(parts, dim=-1)))


def gather_sum(terms: Sequence[tuple[torch.Tensor, Segments]]) -> torch.Tensor:
    """Σ_k P_k[index_k], accumulated in place into the first gathered term.

    With P_k = W_k x_k this is the first layer of an MLP over [x₁[i₁] ‖ x₂[i₂] ‖ …]
    without materialising the concatenation; gathered temporaries die at once.
    A part that is already per edge joins with ``gather_sum(...).addmm_(x, W.t())``.
    """
    (first, first_segments), *rest = terms
    total = gather(first, first_segments)
    for proj, segments in rest:
        total = total.add_(gather(proj, segments))
    return total
