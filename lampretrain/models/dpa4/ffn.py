"""Equivariant FFN with a bilinear product on a Lebedev grid (DPA4 eqs. 31–38, paper-era code path).

u = W_up h (2H channels); V = from_grid(to_grid(u₁) ⊙ to_grid(u₂)) is the exact degree-≤L
projection of the product of two fields; V is gated by σ(W_g u₀), the scalar slot gets a
SwiGLU, and a zero-initialised W_down maps back to C channels.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.s2_grid import SphereGrid
from ..layers.so3_linear import SO3Linear
from .config import DPA4Config


class EquivariantFFN(nn.Module):
    def __init__(self, cfg: DPA4Config):
        super().__init__()
        c, hf = cfg.channels, cfg.ffn_channels
        self.hidden = hf
        self.up = SO3Linear(cfg.lmax, c, 2 * hf)
        self.grid = SphereGrid(cfg.lmax)
        self.gate = nn.Linear(2 * hf, hf, bias=False)
        nn.init.normal_(self.gate.weight, std=0.01)
        self.down = SO3Linear(cfg.lmax, hf, c, zero_init=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(N, D, C) → (N, D, C)."""
        u = self.up(h)  # (N, D, 2H)
        v = self.grid.project_product(u[..., : self.hidden], u[..., self.hidden :])  # (N, D, H)
        scalar = u[:, 0]
        v = v * torch.sigmoid(self.gate(scalar))[:, None, :]
        swiglu = nn.functional.silu(scalar[:, : self.hidden]) * scalar[:, self.hidden :]
        v = torch.cat([v[:, :1] + swiglu[:, None], v[:, 1:]], dim=1)
        return self.down(v)


class ScalarReadoutFFN(nn.Module):
    """deepmd-kit's descriptor readout (``output_ffn``, l = 0 only): d = x₀ + W₂ (W₁ᵃ x₀ ⊙ SiLU(W₁ᵍ x₀)).

    ``up`` stacks W₁ᵃ over W₁ᵍ (value rows, then gate rows); ``down`` starts at zero, so d = x₀ at first.
    """

    def __init__(self, cfg: DPA4Config):
        super().__init__()
        c, h = cfg.channels, cfg.readout_channels
        self.up = nn.Linear(c, 2 * h, bias=False)
        self.down = nn.Linear(h, c, bias=False)
        nn.init.zeros_(self.down.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) → (N, C)."""
        value, gate = self.up(x).chunk(2, dim=-1)
        return x + self.down(value * nn.functional.silu(gate))
