"""m-truncated "m-major" layout of local-frame coefficients and the SO(2)-equivariant linear map.

In an edge's local frame (edge along z) a rotation about the edge mixes only
the pair (−m, +m) of each order m. Keeping |m| ≤ M and ordering rows as
[m=0: l=0..L | m=−1: l=1..L | m=+1: l=1..L | m=−2: l=2..L | ...] (DPA4 SM eqs. 57–59)
makes every SO(2)-equivariant linear map a dense block per |m|.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def m_major_order(lmax: int, mmax: int) -> list[tuple[int, int]]:
    """(l, m) of every kept row, m-major; (L+1) + Σ_{m=1..M} 2(L−m+1) rows."""
    rows = [(l, 0) for l in range(lmax + 1)]
    for m in range(1, min(mmax, lmax) + 1):
        rows += [(l, -m) for l in range(m, lmax + 1)]
        rows += [(l, m) for l in range(m, lmax + 1)]
    return rows


def m_major_rows(lmax: int, mmax: int) -> list[int]:
    """Packed SH index l² + l + m of every kept row."""
    return [l * l + l + m for l, m in m_major_order(lmax, mmax)]


def m_part_rows(lmax: int, mmax: int) -> list[int]:
    """Rows of each |m| part of the m-major layout: [L+1, 2L, 2(L−1), ..., 2(L−M+1)]."""
    return [lmax + 1] + [2 * (lmax - m + 1) for m in range(1, min(mmax, lmax) + 1)]


def truncation_scale(lmax: int, mmax: int) -> torch.Tensor:
    """κ_l = √((2l+1)/(2 min(l, M)+1)) per packed degree-l coefficient ((L+1)²,) (DPA4 SM eq. 59).

    Restores the per-degree norm lost by rotating back only 2 min(l, M)+1 of the 2l+1 orders. Float64, whatever the
    default dtype: a float64 model must not carry float32-rounded constants.
    """
    return torch.tensor(
        [math.sqrt((2 * l + 1) / (2 * min(l, mmax) + 1)) for l in range(lmax + 1) for _ in range(2 * l + 1)],
        dtype=torch.float64,
    )


def _trunc_normal(*shape: int, std: float) -> nn.Parameter:
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(*shape), std=std, a=-3 * std, b=3 * std))


class SO2Linear(nn.Module):
    """Per-focus SO(2)-equivariant linear map on the |m| parts of the m-major layout (DPA4 eqs. 21–23).

    m = 0: one dense ((L+1)C)² matrix mixing degrees and channels. |m| ≥ 1:
    [out₋; out₊] = [[W_u, −W_v], [W_v, W_u]] [x₋; x₊], which commutes with every roll about z.
    Weights (F, in, out) act on each part (F, E, rows_m·C) separately, so the parts never
    need to be concatenated (or sliced apart again in the backward pass); no bias.
    """

    def __init__(self, lmax: int, mmax: int, channels: int, n_focus: int = 1):
        super().__init__()
        self.channels = channels
        self.sizes = [(lmax + 1) * channels] + [(lmax - m + 1) * channels for m in range(1, min(mmax, lmax) + 1)]
        n0 = self.sizes[0]
        self.weight_m0 = _trunc_normal(n_focus, n0, n0, std=1 / math.sqrt(2 * n0))
        self.weight_u = nn.ParameterList(
            [_trunc_normal(n_focus, n, n, std=1 / math.sqrt(2 * n) / math.sqrt(2)) for n in self.sizes[1:]]
        )
        self.weight_v = nn.ParameterList(
            [_trunc_normal(n_focus, n, n, std=1 / math.sqrt(2 * n) / math.sqrt(2)) for n in self.sizes[1:]]
        )

    def forward(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """parts[0] (F, E, (L+1)·C) for m = 0, parts[m] (F, E, 2(L−m+1)·C) as [x₋ₘ | x₊ₘ] → same shapes."""
        out = [torch.bmm(parts[0], self.weight_m0)]
        for x, wu, wv in zip(parts[1:], self.weight_u, self.weight_v):
            # row-vector form of [[W_u, −W_v], [W_v, W_u]]: [x₋, x₊] @ [[W_u, W_v], [−W_v, W_u]]
            w = torch.cat([torch.cat([wu, wv], dim=2), torch.cat([-wv, wu], dim=2)], dim=1)
            out.append(torch.bmm(x, w))
        return out
