"""EMFA SO(2) convolution (DPA4 §4.2.3, eqs. 16–30).

Per edge j → i: pre-mix, rotate the source features into the edge frame keeping |m| ≤ M,
(A1) a low-rank edge–node product whose degree-mixing kernel comes from the radial
features, (A2) F parallel "focus" stacks of residual SO(2) layers with gates and a softmax
competition between them, rotate back, (A3) envelope-gated attention over neighbours
with a null term, then a zero-initialised post-mix (the block starts as the identity).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..layers.equivariant_norm import RMSNorm
from ..layers.scatter import scatter_max, scatter_sum
from ..layers.so2 import SO2Linear, m_major_order
from ..layers.so3_linear import SO3Linear
from .config import DPA4Config
from .geometry import EdgeCache


def _normal(*shape: int, std: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * std)


def _trunc_normal(*shape: int, std: float) -> nn.Parameter:
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(*shape), std=std, a=-3 * std, b=3 * std))


class LowRankEdgeProduct(nn.Module):
    """(A1) y_{l m c} = Σ_r B_{r c} Σ_{l'} K^{(r)}_{l l' |m|}(ρ̃) x_{l' m c} (DPA4 eqs. 18–20).

    K = ρ̃_flat W with ρ̃ the (L+1)·H radial features of the edge; one (L−m+1)² degree
    matrix per |m| and rank, the same for −m and +m (so it commutes with rolls).
    """

    def __init__(self, cfg: DPA4Config):
        super().__init__()
        lmax, mmax, h, r = cfg.lmax, cfg.mmax, cfg.hidden_channels, cfg.rank
        self.rank = r
        self.block_sizes = [lmax - m + 1 for m in range(mmax + 1)]
        k_deg = sum(n * n for n in self.block_sizes)
        fan_in, fan_out = (lmax + 1) * h, k_deg * r
        self.kernel = _trunc_normal(fan_in, fan_out, std=1 / math.sqrt(fan_in + fan_out))
        self.channel_mix = _trunc_normal(r, h, std=1 / math.sqrt(r + h))

    def forward(self, x: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
        """x (E, D_M, H) in m-major rows, rho (E, L+1, H) → (E, D_M, H)."""
        kernel = rho.flatten(1) @ self.kernel  # (E, K_deg·R)
        out, row, col = [], 0, 0
        for m, n in enumerate(self.block_sizes):
            k = kernel[:, col : col + n * n * self.rank].unflatten(1, (self.rank, n, n))  # (E, R, n, n)
            col += n * n * self.rank
            signs = 1 if m == 0 else 2
            xb = x[:, row : row + signs * n].unflatten(1, (signs, n))  # (E, ±, n, H)
            row += signs * n
            y = torch.einsum("erij,epjc,rc->epic", k, xb, self.channel_mix)
            out.append(y.flatten(1, 2))
        return torch.cat(out, dim=1)


class FocusGate(nn.Module):
    """Γ: SiLU on the (l=0, m=0) row, σ(W x₀₀)_l on every row of degree l ≥ 1, per focus."""

    def __init__(self, cfg: DPA4Config):
        super().__init__()
        cf = cfg.focus_channels
        self.weight = _normal(cfg.n_focus, cf, cfg.lmax * cf, std=0.01)
        rows = m_major_order(cfg.lmax, cfg.mmax)
        self.register_buffer("row_degree", torch.tensor([l - 1 for l, _ in rows[1:]]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (F, E, D_M, C_f) → same."""
        scalar = x[:, :, 0]  # (F, E, C_f)
        gates = torch.sigmoid(torch.bmm(scalar, self.weight)).unflatten(-1, (-1, x.shape[-1]))  # (F, E, L, C_f)
        return torch.cat([nn.functional.silu(scalar)[:, :, None], x[:, :, 1:] * gates.index_select(2, self.row_degree)], 2)


class EMFAConvolution(nn.Module):
    def __init__(self, cfg: DPA4Config):
        super().__init__()
        self.cfg = cfg
        c, f, cf, h = cfg.channels, cfg.n_focus, cfg.focus_channels, cfg.hidden_channels
        self.n_rows = len(m_major_order(cfg.lmax, cfg.mmax))
        self.pre_mix = SO3Linear(cfg.lmax, c, h)
        self.lift = nn.Linear(c, h, bias=False) if h != c else None
        self.edge_product = LowRankEdgeProduct(cfg)
        self.so2 = nn.ModuleList(SO2Linear(cfg.lmax, cfg.mmax, cf, f) for _ in range(cfg.so2_layers))
        self.gates = nn.ModuleList(FocusGate(cfg) for _ in range(cfg.so2_layers - 1))
        if f > 1:
            self.focus_norm = RMSNorm(cf)
            self.focus_logit = _normal(f, cf, std=0.01)
        self.att_norm = RMSNorm(cf)
        self.query = _trunc_normal(f, cf, cf, std=1 / math.sqrt(2 * cf))
        self.key = _trunc_normal(f, cf, cf, std=1 / math.sqrt(2 * cf))
        self.radial_logit = _normal(c, f, std=0.01)
        self.out_gate = _normal(f, cf, std=0.01)
        self.null_logit = nn.Parameter(torch.full((f,), 0.5413))  # softplus(0.5413) ≈ 1
        self.post_mix = SO3Linear(cfg.lmax, h, c, zero_init=True)

    def forward(self, h: torch.Tensor, geo: EdgeCache, radial: torch.Tensor) -> torch.Tensor:
        """h (N, D, C), radial (E, L+1, C) with edge type features → (N, D, C)."""
        cfg = self.cfg
        f, cf = cfg.n_focus, cfg.focus_channels
        n_edges, rows = geo.src.shape[0], self.n_rows
        xp = self.pre_mix(h)  # (N, D, H)
        rho = radial if self.lift is None else self.lift(radial)  # (E, L+1, H)
        x = torch.bmm(geo.to_local.to(xp.dtype), xp.index_select(0, geo.src))  # (E, D_M, H)
        x = self.edge_product(x, rho)
        x = x.unflatten(-1, (f, cf)).permute(2, 0, 1, 3)  # (F, E, D_M, C_f)
        entry_scalar = x[:, :, 0]
        for layer, so2 in enumerate(self.so2):
            y = so2(x.reshape(f, n_edges, rows * cf)).unflatten(-1, (rows, cf))
            x = x + (self.gates[layer](y) if layer < len(self.gates) else y)
        if f > 1:
            logits = (self.focus_norm(entry_scalar) * self.focus_logit[:, None, :]).sum(-1) / cfg.focus_temperature
            alpha = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=0) * (1 - cfg.focus_smoothing) + cfg.focus_smoothing / f
            x = x * alpha[:, :, None, None].to(x.dtype)
        x = x.permute(1, 2, 0, 3).reshape(n_edges, rows, f * cf)
        msg = torch.bmm(geo.to_global.to(x.dtype), x)  # (E, D, H)
        weight, out_gate = self.attention(xp[:, 0], geo, radial[:, 0])
        msg = (msg.unflatten(-1, (f, cf)) * weight[:, None, :, None].to(msg.dtype)).flatten(2)
        agg = scatter_sum(msg, geo.dst, geo.n_nodes).unflatten(-1, (f, cf)) * out_gate[:, None, :, None].to(msg.dtype)
        return self.post_mix(agg.flatten(2))

    def attention(self, scalar: torch.Tensor, geo: EdgeCache, rho0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A3) w_ij = s5² e^ℓ / (softplus ζ + Σ_k s5² e^ℓ_ik) per focus (E, F), and the output gate (N, F).

        ℓ_ij = ⟨Q n(x'_i), K n(x'_j)⟩/√C_f + W^rb ρ̃_ij,0. Float32 or wider, with autocast off.
        """
        f, cf = self.cfg.n_focus, self.cfg.focus_channels
        dtype = torch.promote_types(geo.edge_env.dtype, torch.float32)
        with torch.autocast(scalar.device.type, enabled=False):
            s = self.att_norm(scalar.to(dtype).unflatten(-1, (f, cf))).transpose(0, 1)  # (F, N, C_f)
            q = torch.bmm(s, self.query.to(dtype)).index_select(1, geo.dst)
            k = torch.bmm(s, self.key.to(dtype)).index_select(1, geo.src)
            logits = (q * k).sum(-1).T / math.sqrt(cf) + rho0.to(dtype) @ self.radial_logit.to(dtype)  # (E, F)
            shift = scatter_max(logits, geo.dst, geo.n_nodes).clamp_min(0.0)  # ≥ 0 keeps the null term ≤ 1
            z = geo.edge_env.to(dtype).pow(2)[:, None] * torch.exp(logits - shift[geo.dst])
            null = nn.functional.softplus(self.null_logit.to(dtype)) * torch.exp(-shift)  # (N, F)
            weight = z / (null + scatter_sum(z, geo.dst, geo.n_nodes))[geo.dst]
            out_gate = torch.sigmoid((s * self.out_gate.to(dtype)[:, None, :]).sum(-1)).T  # (N, F)
        return weight, out_gate
