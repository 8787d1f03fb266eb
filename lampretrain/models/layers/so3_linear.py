"""Degree-wise linear map on packed SH features: one C_in×C_out matrix per l, shared over m."""

from __future__ import annotations

import math

import torch
from torch import nn

from .spherical_harmonics import sh_degrees


class SO3Linear(nn.Module):
    """out_{l m} = x_{l m} W_l, x (N, (L+1)², C_in) → (N, (L+1)², C_out); bias-free, hence equivariant."""

    def __init__(self, lmax: int, in_channels: int, out_channels: int, zero_init: bool = False):
        super().__init__()
        bound = 0.0 if zero_init else 1 / math.sqrt(in_channels)
        self.weight = nn.Parameter(torch.empty(lmax + 1, in_channels, out_channels).uniform_(-bound, bound))
        self.register_buffer("degree", sh_degrees(lmax), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.index_select(0, self.degree)  # (D, C_in, C_out)
        return torch.einsum("ndi,dio->ndo", x, w)
