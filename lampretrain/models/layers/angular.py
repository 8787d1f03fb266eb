"""Bases of the angle between two bonds that share a centre atom."""

from __future__ import annotations

import math

import torch


def bond_angle(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """θ = arccos((u1·u2)(1 − 10⁻⁶)) for unit vectors (A, 3) → (A,).

    The shrink factor keeps dθ/d(cos θ) finite for collinear bonds (CHGNet/MatRIS convention).
    """
    return torch.acos((u1 * u2).sum(dim=-1) * (1 - 1e-6))


def fourier_angle_basis(theta: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """[1/√2, sin(k θ), cos(k θ)] / √π for k in ``frequencies``, (A,) × (K,) → (A, 2K+1).

    An orthonormal Fourier series on [0, 2π) when k = 1..K; MatRIS learns k.
    """
    kt = theta[:, None] * frequencies  # (A, K)
    const = torch.full_like(theta[:, None], 1 / math.sqrt(2))
    return torch.cat([const, torch.sin(kt), torch.cos(kt)], dim=-1) / math.sqrt(math.pi)
