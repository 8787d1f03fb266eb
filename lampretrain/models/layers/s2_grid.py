"""Exact projection between packed SH coefficients and values on a Lebedev grid.

A bilinear product of two degree-≤L fields has degree ≤ 2L; projecting it back
onto degree ≤ L integrates a polynomial of degree ≤ 3L, which a Lebedev rule of
order ≥ 3L does exactly (DPA4 eqs. 31–38, ``resolve_s2_grid_resolution``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .lebedev import lebedev_grid, lebedev_order_for
from .spherical_harmonics import real_spherical_harmonics, sh_degrees


class SphereGrid(nn.Module):
    """to_grid (A, D) = Ŷ(q_a)/√(L+1); from_grid (D, A) = w_a (2l+1) √(L+1) Ŷ_lm(q_a).

    With "norm" SH (Σ_a w_a Ŷ_lm Ŷ_l'm' = δ/(2l+1), Σ w_a = 1), from_grid ∘ to_grid = I on degrees ≤ L.
    """

    def __init__(self, lmax: int, order: int | None = None):
        super().__init__()
        self.order = lebedev_order_for(3 * lmax) if order is None else order
        points, weights = lebedev_grid(self.order)
        sh = real_spherical_harmonics(torch.from_numpy(points), lmax, "norm")  # (A, D)
        scale = math.sqrt(lmax + 1)
        degree = sh_degrees(lmax).double()
        self.register_buffer("to_grid", sh / scale, persistent=False)
        self.register_buffer(
            "from_grid", (sh * torch.from_numpy(weights)[:, None]).T * (2 * degree + 1)[:, None] * scale, persistent=False
        )

    def project_product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Degree-≤L part of the pointwise product of two fields, (N, D, C) × (N, D, C) → (N, D, C)."""
        to_grid = self.to_grid.to(a.dtype)
        grid = torch.einsum("ad,ndc->nac", to_grid, a) * torch.einsum("ad,ndc->nac", to_grid, b)
        return torch.einsum("da,nac->ndc", self.from_grid.to(grid.dtype), grid)
