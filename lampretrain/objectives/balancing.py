"""Weights of the per-dataset × per-task loss matrix L (K, T).

* ``none``: L_total = Σ c_kt L_kt with the configured coefficients c.
* ``static``: c_kt / s_kt with s from prep statistics (per-atom residual RMS for
  energy, force RMS for forces): a mean-only model scores ≈ 1 on every dataset.
  Each s_kt is first clamped to [s̄_t / R, s̄_t · R] around the geometric median
  s̄_t of task t over the datasets (R = ``max_ratio``, default 10). Without the
  clamp a dataset of relaxed structures (force RMS 0.015 eV/Å in the bundled
  oxides) or of two near-identical frames (energy RMS 1 meV/atom) takes weights
  100–1000× the others, the clipped gradient then serves only that term, and the
  shared backbone learns ≈ 0 forces everywhere (seen in the demo before the clamp).
* ``uncertainty`` (Kendall, Gal & Cipolla 2018, Laplace form for MAE losses):
  Σ [w_kt e^(−u_kt) L_kt + u_kt] with learnable u, starting from the static weights
  w = c/s; at the optimum e^(−u) = 1/(w L), so every term is pushed to the same scale
  whatever its units. With ``max_ratio_dynamic`` = R_u the correction is bounded,
  u = log R_u · tanh(θ / log R_u) (θ learnable): a term whose loss falls towards 0
  (energies of near-identical conformers, relaxed structures' forces) may gain at most
  R_u× its static weight instead of growing without limit and taking the clipped
  gradient from every other term. The u of a term that has no labels in a batch
  receive no gradient in that step.
"""

from __future__ import annotations

import math

import torch

from ..models.heads.energy import clamp_to_median

BALANCING = ("none", "static", "uncertainty")


class LossBalancer(torch.nn.Module):
    """Combines L (K, T) under a presence mask into a scalar; also returns the effective weights (K, T)."""

    def __init__(
        self,
        method: str,
        coefficients: torch.Tensor,
        scales: torch.Tensor,
        max_ratio: float = 10.0,
        max_ratio_dynamic: float | None = None,
    ):
        super().__init__()
        if method not in BALANCING:
            raise ValueError(f"objective.balancing: '{method}' not one of {', '.join(BALANCING)}")
        if max_ratio_dynamic is not None and not max_ratio_dynamic > 1:
            raise ValueError(f"objective.uncertainty_max_ratio must be > 1 (or null), got {max_ratio_dynamic}")
        self.method = method
        base = coefficients if method == "none" else coefficients / clamp_to_median(scales, max_ratio)
        self.register_buffer("base", base.to(torch.float32))
        self.bound = None if max_ratio_dynamic is None else math.log(max_ratio_dynamic)
        self.log_variance = torch.nn.Parameter(torch.zeros_like(self.base)) if method == "uncertainty" else None

    def log_variances(self) -> torch.Tensor | None:
        """u (K, T): the learnable θ, squashed into (−log R_u, log R_u) when bounded."""
        if self.log_variance is None or self.bound is None:
            return self.log_variance
        return self.bound * torch.tanh(self.log_variance / self.bound)

    def weights(self) -> torch.Tensor:
        """Effective multiplier of each L_kt, (K, T)."""
        u = self.log_variances()
        if u is None:
            return self.base
        return self.base * torch.exp(-u)

    def forward(self, losses: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ over present terms; returns (total, weighted terms (K, T))."""
        terms = self.weights().to(losses.dtype) * losses
        u = self.log_variances()
        if u is not None:
            terms = terms + u.to(losses.dtype)
        terms = torch.where(present, terms, torch.zeros_like(terms))
        return terms.sum(), terms
