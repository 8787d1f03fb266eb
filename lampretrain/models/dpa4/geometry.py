"""Per-forward edge cache: distances, envelopes, radial basis, edge frames, Wigner rows, smooth degree.

Built once per forward in the model's dtype (never under autocast) and shared by all blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..layers.envelopes import c3_envelope
from ..layers.radial import bessel_frequencies, sine_bessel
from ..layers.scatter import Segments, scatter_sum
from ..layers.so2 import m_major_rows, truncation_scale
from ..layers.spherical_harmonics import real_spherical_harmonics
from ..layers.wigner import WignerD, edge_quaternion, quaternion_multiply, quaternion_to_matrix, z_roll_quaternion
from .config import DPA4Config


@dataclass
class EdgeCache:
    src: torch.Tensor  # (E,) neighbor j
    dst: torch.Tensor  # (E,) centre i
    n_nodes: int
    length: torch.Tensor  # (E,) Å
    unit: torch.Tensor  # (E, 3) r̂_ij
    edge_env: torch.Tensor  # (E,) s5(r)
    rbf: torch.Tensor  # (E, n_radial) φ_n(r)
    sh: torch.Tensor  # (E, D) "norm" real SH Ŷ(r̂_ij)
    to_local: torch.Tensor  # (E, rows, D) rows of P_M D(R_ij), m-major
    to_global: torch.Tensor  # (E, D, rows) columns of Ξ_M D(R_ij)ᵀ P_Mᵀ
    inv_sqrt_deg: torch.Tensor  # (N,) (Σ_j s5² + floor)^(-1/2)
    _chunks: dict[int, list[tuple[Segments, Segments]]] = field(default_factory=dict)

    def chunk_segments(self, size: int) -> list[tuple[Segments, Segments]]:
        """(source, centre) segment maps of each ``size``-edge chunk, built once and shared by every block."""
        if size not in self._chunks:
            self._chunks[size] = [
                (Segments(s, self.n_nodes), Segments(d, self.n_nodes))
                for s, d in zip(self.src.split(size), self.dst.split(size))
            ]
        return self._chunks[size]


class EdgeGeometry(nn.Module):
    """Holds the learnable radial frequencies and the Wigner-D evaluator."""

    def __init__(self, cfg: DPA4Config):
        super().__init__()
        self.cfg = cfg
        # "adam_" routes the frequencies to Adam without weight decay (DPA4 §2)
        self.adam_freqs = nn.Parameter(bessel_frequencies(cfg.n_radial, cfg.cutoff))
        self.wigner = WignerD(cfg.lmax, m_major_rows(cfg.lmax, cfg.mmax))
        self.register_buffer("kappa", truncation_scale(cfg.lmax, cfg.mmax), persistent=False)

    def forward(self, vectors: torch.Tensor, edge_index: torch.Tensor, n_nodes: int, roll: bool) -> EdgeCache:
        """``vectors`` r_ij (E, 3) for ``edge_index`` [centre i, neighbor j]."""
        cfg = self.cfg
        dst, src = edge_index[0], edge_index[1]
        length = vectors.norm(dim=-1)
        unit = vectors / length[:, None]
        x = length / cfg.cutoff
        edge_env = c3_envelope(x, cfg.edge_exponent)
        rbf = sine_bessel(length, self.adam_freqs.to(length.dtype)) * c3_envelope(x, cfg.rbf_exponent)[:, None]
        q = edge_quaternion(unit)
        if roll:
            gamma = torch.rand_like(length) * (2 * math.pi)
            q = quaternion_multiply(z_roll_quaternion(gamma), q)
        to_local = self.wigner(quaternion_to_matrix(q))  # (E, D_M, D)
        to_global = to_local.transpose(1, 2) * self.kappa.to(to_local.dtype)[:, None]
        degree = scatter_sum(edge_env.pow(2), dst, n_nodes)
        return EdgeCache(
            src=src,
            dst=dst,
            n_nodes=n_nodes,
            length=length,
            unit=unit,
            edge_env=edge_env,
            rbf=rbf,
            sh=real_spherical_harmonics(unit, cfg.lmax, "norm"),
            to_local=to_local,
            to_global=to_global,
            inv_sqrt_deg=torch.rsqrt(degree + cfg.degree_floor),
        )
