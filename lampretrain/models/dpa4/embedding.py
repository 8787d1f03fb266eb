"""Shared radial MLP, environment-seeded scalar features and the geometry-informed embedding (GIE).

DPA4 §4.2.2 (eqs. 6–15): the l = 0 slot starts from the element embedding T[Z_i],
modulated (FiLM) by a DeepPot-SE style invariant of the neighbourhood; the l ≥ 1
slots start from Σ_j Ŷ_l(r̂_ij) · radial_l(r_ij), so the first block already sees directions.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..layers.equivariant_norm import RMSNorm
from ..layers.scatter import scatter_sum
from ..layers.spherical_harmonics import sh_degrees
from .config import DPA4Config
from .geometry import EdgeCache


class RadialMLP(nn.Module):
    """φ (E, n_r) → (E, L+1, C): Linear → RMSNorm → SiLU → Linear, bias-free, times s5.

    Computed once per forward and shared by every block; bias-free so a zero basis gives zero.
    """

    def __init__(self, cfg: DPA4Config):
        super().__init__()
        c = cfg.channels
        self.lmax = cfg.lmax
        self.net = nn.Sequential(
            nn.Linear(cfg.n_radial, c, bias=False),
            RMSNorm(c, cfg.rms_eps) if cfg.radial_norm else nn.Identity(),
            nn.SiLU(),
            nn.Linear(c, (cfg.lmax + 1) * c, bias=False),
        )

    def forward(self, geo: EdgeCache) -> torch.Tensor:
        out = self.net(geo.rbf) * geo.edge_env[:, None]
        return out.unflatten(-1, (self.lmax + 1, -1))


class EnvironmentSeed(nn.Module):
    """FiLM of the l = 0 features by the neighbourhood invariant D_i = A_iᵀ A_i[:, :K] (DPA4 eqs. 10–13).

    ũ_ij = [s, s r̂_ij] with s = s5/r; g_ij = G([MLP(φ_ij) ‖ t[Z_j] ‖ t[Z_i]]);
    A_i = n_i Σ_j ũ_ij ⊗ g_ij (4 × C_env). The FiLM projection is zero-initialised and its
    strengths start at 0.01, so training begins from h = T[Z].
    """

    def __init__(self, cfg: DPA4Config):
        super().__init__()
        c = cfg.channels
        env = min(c, 128)
        self.axis_dim = 4 if env < 64 else 8
        type_dim = min(max(c // 4, 8), 32)
        rbf_out = max(32, env - 2 * type_dim)
        hidden = min(256, max(2 * env, rbf_out + 2 * type_dim))
        self.type_table = nn.Embedding(cfg.n_elements, type_dim)
        self.radial = nn.Sequential(
            nn.Linear(cfg.n_radial, rbf_out, bias=False), nn.SiLU(), nn.Linear(rbf_out, rbf_out, bias=False)
        )
        self.mix = nn.Sequential(
            nn.Linear(rbf_out + 2 * type_dim, hidden, bias=False), nn.SiLU(), nn.Linear(hidden, env, bias=False)
        )
        self.film = nn.Linear(env * self.axis_dim, 2 * c, bias=False)
        nn.init.zeros_(self.film.weight)
        self.norm_scale = RMSNorm(c, cfg.rms_eps)
        self.norm_shift = RMSNorm(c, cfg.rms_eps)
        self.log_strength = nn.Parameter(torch.full((2,), math.log(0.01)))

    def forward(self, h0: torch.Tensor, species: torch.Tensor, geo: EdgeCache) -> torch.Tensor:
        """h0 (N, C) → (N, C)."""
        s = geo.edge_env / geo.length
        u = torch.cat([s[:, None], s[:, None] * geo.unit], dim=-1)  # (E, 4)
        t = self.type_table(species)
        g = self.mix(torch.cat([self.radial(geo.rbf), t[geo.src], t[geo.dst]], dim=-1))  # (E, C_env)
        a = scatter_sum(u[:, :, None] * g[:, None, :], geo.dst, geo.n_nodes)  # (N, 4, C_env)
        a = a * geo.inv_sqrt_deg[:, None, None]
        d = torch.einsum("nac,nak->nck", a, a[..., : self.axis_dim])  # (N, C_env, K)
        scale, shift = self.film(d.flatten(1)).chunk(2, dim=-1)
        strength = self.log_strength.exp()
        return h0 * (1 + strength[0] * torch.tanh(self.norm_scale(scale))) + strength[1] * torch.tanh(
            self.norm_shift(shift)
        )


def geometric_embedding(radial: torch.Tensor, geo: EdgeCache, lmax: int) -> torch.Tensor:
    """GIE (DPA4 eq. 14): h_{i,lm,c} = n_i Σ_j Ŷ_lm(r̂_ij) radial_{ij,l,c}, (E, L+1, C) → (N, D, C)."""
    msg = geo.sh[:, :, None] * radial.index_select(1, sh_degrees(lmax).to(radial.device))  # (E, D, C)
    return scatter_sum(msg, geo.dst, geo.n_nodes) * geo.inv_sqrt_deg[:, None, None]
