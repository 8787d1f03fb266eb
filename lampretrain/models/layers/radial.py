"""Radial bases of interatomic distance."""

from __future__ import annotations

import math

import torch


def sine_bessel(r: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """Spherical Bessel j0 basis sin(w_n r) / r, (E,) × (n,) → (E, n).

    With w_n = nπ/r_c this is the DimeNet/CHGNet basis (up to the √(2/r_c)
    prefactor); making w_n learnable gives MatRIS's and DPA4's variant.
    """
    return torch.sin(r[:, None] * frequencies) / r[:, None]


def bessel_frequencies(n: int, cutoff: float) -> torch.Tensor:
    """Initial frequencies w_n = nπ/r_c, n = 1..n."""
    return torch.arange(1, n + 1, dtype=torch.get_default_dtype()) * (math.pi / cutoff)
