"""Initial atom, bond and angle features (spec §2)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..layers.angular import bond_angle, fourier_angle_basis
from ..layers.envelopes import polynomial_envelope
from ..layers.norms import make_norm
from ..layers.radial import sine_bessel


class LearnableBessel(torch.nn.Module):
    """rbf_n(r) = √(2/r_c) sin(f_n r / r_c) / r · u_p(r / r_c), f_n learnable, initialised to nπ."""

    def __init__(self, num: int, cutoff: float, envelope_exponent: int):
        super().__init__()
        self.cutoff = cutoff
        self.p = envelope_exponent
        self.frequencies = torch.nn.Parameter(math.pi * torch.arange(1, num + 1, dtype=torch.get_default_dtype()))

    def envelope(self, r: torch.Tensor) -> torch.Tensor:  # (B,) → (B,)
        """u_p(r / r_c): 1 at r = 0, zero with its first two derivatives at r_c."""
        return polynomial_envelope(r / self.cutoff, self.p)

    def forward(self, r: torch.Tensor, env: torch.Tensor) -> torch.Tensor:  # (B,), (B,) → (B, num)
        return math.sqrt(2 / self.cutoff) * sine_bessel(r, self.frequencies / self.cutoff) * env[:, None]


class BondBases(NamedTuple):
    """Per bond: the initial feature and the radial quantities the blocks weight messages with."""

    feature: torch.Tensor  # (B, C) e⁰
    rbf_pair: torch.Tensor  # (B, R) envelope-multiplied Bessel basis at the pair cutoff
    rbf_3b: torch.Tensor  # (B, R) the same at the three-body cutoff
    env_pair: torch.Tensor  # (B,) u_p(r / r_c)
    env_3b: torch.Tensor  # (B,) u_p(r / r_3b), 0 beyond the three-body cutoff


class AtomEmbedding(torch.nn.Module):
    """h⁰ = SiLU(W · onehot(Z)) with a learned table for Z = 1..num_elements."""

    def __init__(self, num_elements: int, dim: int):
        super().__init__()
        self.table = torch.nn.Embedding(num_elements, dim)
        self.linear = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, numbers: torch.Tensor) -> torch.Tensor:  # (N,) → (N, C)
        return F.silu(self.linear(self.table(numbers - 1)))


class BondEmbedding(torch.nn.Module):
    """e⁰ = SiLU(W_sw LN(W₂ W₁ rbf_pair(r))) plus the envelopes and envelope-weighted bases the blocks use."""

    def __init__(self, num_radial: int, dim: int, cutoff: float, three_body_cutoff: float, p: int, norm: str):
        super().__init__()
        self.pair_basis = LearnableBessel(num_radial, cutoff, p)
        self.three_body_basis = LearnableBessel(num_radial, three_body_cutoff, p)
        self.linear1 = torch.nn.Linear(num_radial, dim, bias=False)
        self.linear2 = torch.nn.Linear(dim, dim, bias=False)
        self.norm = make_norm(norm, dim)
        self.out = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, r: torch.Tensor) -> BondBases:
        """Bond lengths (B,) → e⁰, both bases and both envelopes.

        e⁰ does not vanish at the cutoff (LN(0) = β): only what the blocks sum over bonds has to.
        """
        env_pair = self.pair_basis.envelope(r)
        rbf_pair = self.pair_basis(r, env_pair)
        env_3b = self.three_body_basis.envelope(r)
        rbf_3b = self.three_body_basis(r, env_3b)
        e = F.silu(self.out(self.norm(self.linear2(self.linear1(rbf_pair)))))
        return BondBases(e, rbf_pair, rbf_3b, env_pair, env_3b)


class AngleEmbedding(torch.nn.Module):
    """t⁰ = SiLU(W₂ W₁ fourier(θ)) with learnable Fourier frequencies initialised to 1..K."""

    def __init__(self, num_angular: int, dim: int):
        super().__init__()
        k = (num_angular - 1) // 2
        self.frequencies = torch.nn.Parameter(torch.arange(1, k + 1, dtype=torch.get_default_dtype()))
        self.linear1 = torch.nn.Linear(num_angular, dim, bias=False)
        self.linear2 = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
        """Unit vectors of the two bonds of each angle (A, 3) → (A, C)."""
        basis = fourier_angle_basis(bond_angle(u1, u2), self.frequencies)  # (A, 2K+1)
        # both maps are linear: compose them once instead of a (A, C) intermediate
        return F.silu(basis @ (self.linear2.weight @ self.linear1.weight).t())
