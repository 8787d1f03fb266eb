"""Scalar readout: d = x₀ + GLU-FFN(x₀), ε_i = GLU fitting(d) + bias[Z_i] (DPA4 §7)."""

from __future__ import annotations

import torch
from torch import nn


class GLU(nn.Module):
    """Linear(in → 2·hidden) then value · silu(gate)."""

    def __init__(self, in_channels: int, hidden: int, bias: bool):
        super().__init__()
        self.proj = nn.Linear(in_channels, 2 * hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * nn.functional.silu(gate)


class EnergyReadout(nn.Module):
    """Atomic energies (N,) from the l = 0 features (N, C); the per-element bias is a buffer set from data."""

    def __init__(self, channels: int, hidden: int, n_elements: int):
        super().__init__()
        self.out_ffn = nn.Sequential(GLU(channels, hidden, bias=False), nn.Linear(hidden, channels, bias=False))
        nn.init.zeros_(self.out_ffn[1].weight)
        self.fitting = nn.Sequential(GLU(channels, hidden, bias=True), nn.Linear(hidden, 1, bias=False))
        self.register_buffer("element_energy", torch.zeros(n_elements))

    def forward(self, scalar: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        d = scalar + self.out_ffn(scalar)
        return self.fitting(d).squeeze(-1) + self.element_energy.to(d.dtype)[species]
