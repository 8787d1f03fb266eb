"""Per-atom vector heads (direct forces, denoising), equivariant by construction.

Two ways to get a vector per atom from a backbone:

* equivariant features (DPA4): a Cartesian degree-1 block x¹ (N, 3, C) turns with R,
  so any channel mix gated by invariant scalars is a vector: v_i = Σ_h (x¹_i W)_h g_h(x⁰_i);
* invariant features (MatRIS): v_i = Σ_j w_ij r̂_ij with w_ij an MLP of invariants
  (h_i, h_j, φ(r_ij)), smooth at the cutoff; invariant weights times unit vectors rotate with R.

Both take an optional :class:`VectorCondition` (the DeNS noise scale and input forces):
invariant parts (σ, |f|) are added to the scalars; the force direction enters as f_i ⊗ a(|f_i|)
on the degree-1 block (equivariant) or as the bond projections f_i·r̂_ij, f_j·r̂_ij (invariant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layers.envelopes import polynomial_envelope
from ..layers.radial import bessel_frequencies, sine_bessel
from ..layers.scatter import scatter_sum

N_SMEAR = 8


@dataclass
class VectorCondition:
    """DeNS inputs per atom: noise std σ_i (N,) in Å (0: clean) and input forces f_i (N, 3) eV/Å (0: none)."""

    sigma: torch.Tensor
    force: torch.Tensor


def gaussian_smearing(values: torch.Tensor, n: int, vmax: float) -> torch.Tensor:
    """exp(−(v − μ_k)² / 2δ²) on n centres μ_k evenly spaced in [0, vmax], δ their spacing: (...,) → (..., n)."""
    centres = torch.linspace(0.0, vmax, n, device=values.device, dtype=values.dtype)
    delta = vmax / (n - 1)
    return torch.exp(-0.5 * ((values[..., None] - centres) / delta) ** 2)


class ConditionScalars(torch.nn.Module):
    """Invariant embedding of (σ/σ_ref, log(1 + |f|)) → (N, C), added to the head's scalar input."""

    def __init__(self, channels: int, sigma_ref: float):
        super().__init__()
        self.sigma_ref = sigma_ref
        self.net = torch.nn.Sequential(
            torch.nn.Linear(1 + N_SMEAR, channels), torch.nn.SiLU(), torch.nn.Linear(channels, channels)
        )

    def magnitude_basis(self, force: torch.Tensor) -> torch.Tensor:
        return gaussian_smearing(torch.log1p(force.norm(dim=-1)), N_SMEAR, 3.0)  # (N, 8)

    def forward(self, cond: VectorCondition) -> torch.Tensor:
        basis = self.magnitude_basis(cond.force) * (cond.force.abs().sum(-1, keepdim=True) > 0)
        return self.net(torch.cat([(cond.sigma / self.sigma_ref)[:, None], basis], dim=-1))


class EquivariantVectorHead(torch.nn.Module):
    """v_i = Σ_h (x¹_i W)_h · g_h(x⁰_i) from equivariant features, (N, 3)."""

    def __init__(self, channels: int, hidden: int, sigma_ref: float | None = None, vector_channels: int | None = None):
        super().__init__()
        vector_channels = vector_channels or channels
        self.mix = torch.nn.Linear(vector_channels, hidden, bias=False)  # a bias would break equivariance
        self.gate = torch.nn.Sequential(
            torch.nn.Linear(channels, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden)
        )
        self.condition = ConditionScalars(channels, sigma_ref) if sigma_ref else None
        self.force_scale = torch.nn.Linear(N_SMEAR, vector_channels) if sigma_ref else None

    def forward(
        self, scalar: torch.Tensor, vector: torch.Tensor, cond: VectorCondition | None = None
    ) -> torch.Tensor:
        """scalar (N, C), vector (N, 3, C_v) Cartesian → (N, 3)."""
        if cond is not None and self.condition is not None:
            scalar = scalar + self.condition(cond)
            vector = vector + cond.force[:, :, None] * self.force_scale(self.condition.magnitude_basis(cond.force))[:, None]
        return torch.einsum("nxh,nh->nx", self.mix(vector), self.gate(scalar))


class EdgeVectorHead(torch.nn.Module):
    """v_i = Σ_j w_ij r̂_ij, w_ij = MLP(h_i, h_j, φ(r_ij)[, f_i·r̂_ij, f_j·r̂_ij]) · u(r_ij / r_c), (N, 3)."""

    def __init__(self, channels: int, hidden: int, cutoff: float, n_radial: int = 8, sigma_ref: float | None = None):
        super().__init__()
        self.cutoff = cutoff
        self.register_buffer("frequencies", bessel_frequencies(n_radial, cutoff))
        self.centre = torch.nn.Linear(channels, hidden)
        self.neighbor = torch.nn.Linear(channels, hidden, bias=False)
        self.radial = torch.nn.Linear(n_radial, hidden, bias=False)
        self.out = torch.nn.Linear(hidden, 1)
        self.condition = ConditionScalars(channels, sigma_ref) if sigma_ref else None
        self.projection = torch.nn.Linear(2, hidden, bias=False) if sigma_ref else None

    def forward(
        self,
        scalar: torch.Tensor,
        edge_index: torch.Tensor,
        vectors: torch.Tensor,
        cond: VectorCondition | None = None,
    ) -> torch.Tensor:
        """scalar (N, C); edge_index (2, E) [centre i, neighbor j]; vectors r_ij (E, 3) → (N, 3)."""
        i, j = edge_index
        length = vectors.norm(dim=-1)  # (E,)
        unit = vectors / length[:, None]
        if cond is not None and self.condition is not None:
            scalar = scalar + self.condition(cond)
        pre = (
            self.centre(scalar).index_select(0, i)
            + self.neighbor(scalar).index_select(0, j)
            + self.radial(sine_bessel(length, self.frequencies.to(length.dtype)) * math.sqrt(2.0 / self.cutoff))
        )  # (E, H)
        if cond is not None and self.projection is not None:
            along = torch.stack([(cond.force[i] * unit).sum(-1), (cond.force[j] * unit).sum(-1)], dim=-1)  # (E, 2)
            pre = pre + self.projection(along)
        w = self.out(F.silu(pre)).squeeze(-1) * polynomial_envelope(length / self.cutoff, 5)  # (E,)
        return scatter_sum(w[:, None] * unit, i, scalar.shape[0])
