"""One DPA4 interaction block: x ← x + N_post(Conv(x)); x ← x + FFN(N_pre(x)) ("Post & Pre")."""

from __future__ import annotations

import torch
from torch import nn

from ..layers.equivariant_norm import EquivariantRMSNorm
from .config import DPA4Config
from .convolution import EMFAConvolution
from .ffn import EquivariantFFN
from .geometry import EdgeCache


class InteractionBlock(nn.Module):
    def __init__(self, cfg: DPA4Config):
        super().__init__()
        self.conv = EMFAConvolution(cfg)
        self.conv_norm = EquivariantRMSNorm(cfg.lmax, cfg.channels)
        self.ffn_norm = EquivariantRMSNorm(cfg.lmax, cfg.channels)
        self.ffn = EquivariantFFN(cfg)

    def forward(self, x: torch.Tensor, geo: EdgeCache, radial: torch.Tensor) -> torch.Tensor:
        x = x + self.conv_norm(self.conv(x, geo, radial))
        return x + self.ffn(self.ffn_norm(x))
