"""Normalisations that keep SO(3) equivariance, computed in float32 or wider."""

from __future__ import annotations

import torch
from torch import nn

from .spherical_harmonics import sh_degrees


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class RMSNorm(nn.Module):
    """x / √(mean_c x² + ε) · γ over the last axis, in float32 even under autocast."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _wide(x)
        with torch.autocast(x.device.type, enabled=False):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(x.dtype)


class EquivariantRMSNorm(nn.Module):
    """DPA4's equivariant RMSNorm (SM eqs. 65–66) on (N, (L+1)², C).

    The l = 0 slot is centred over channels; σ² = Σ_{l,m,c} h²/((2l+1)(L+1)C) weighs
    every degree equally; out = h/√(σ²+ε) · γ_{l,c}, plus a bias β_c on l = 0 only.
    """

    def __init__(self, lmax: int, channels: int, eps: float = 1e-5):
        super().__init__()
        self.lmax = lmax
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(lmax + 1, channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        degree = sh_degrees(lmax)
        self.register_buffer("degree", degree, persistent=False)
        self.register_buffer("balance", 1.0 / ((2 * degree + 1) * (lmax + 1)).double(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _wide(x)
        with torch.autocast(x.device.type, enabled=False):
            scalar = x[:, :1] - x[:, :1].mean(-1, keepdim=True)
            x = torch.cat([scalar, x[:, 1:]], dim=1)  # (N, D, C)
            var = (x.pow(2).mean(-1) * self.balance.to(x.dtype)).sum(-1)  # (N,)
            out = x * torch.rsqrt(var + self.eps)[:, None, None] * self.weight.index_select(0, self.degree).to(x.dtype)
            return torch.cat([out[:, :1] + self.bias.to(x.dtype), out[:, 1:]], dim=1)
