"""DPA4 hyper-parameters and the four named sizes of the paper (arXiv 2606.02419, SM Table "Matbench config")."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ...config import override


@dataclass(frozen=True)
class DPA4Config:
    channels: int = 64  # C
    lmax: int = 3  # L
    mmax: int = 1  # M, orders kept inside the SO(2) convolution
    n_blocks: int = 3
    so2_layers: int = 4  # S, residual SO(2) layers per focus
    n_focus: int = 1  # F
    focus_dim: int = 0  # C_f, 0 → channels
    rank: int = 1  # R of the low-rank edge–node product
    n_radial: int = 16
    cutoff: float = 6.0
    rbf_exponent: int = 7  # C³ envelope s7 inside the radial basis
    edge_exponent: int = 5  # C³ envelope s5 on edges, degree and attention
    ffn_hidden: int = 0  # H_FFN, 0 → 32·⌈(8/3)·C/32⌉
    n_elements: int = 118
    degree_floor: float = 0.25  # n_i = (Σ_j s5² + floor)^(-1/2)
    radial_norm: bool = True  # RMSNorm inside the shared radial MLP (paper era)
    env_seed: bool = True
    random_roll: bool = True  # random roll of every edge frame about its axis, in training
    autocast_bf16: bool = False  # bf16 autocast inside the interaction blocks only
    edge_chunk: int = 4096  # edges per chunk of the per-edge message pipeline, 0 → all edges at once
    # stored per-edge activations of all blocks together, MB (estimated); chunks beyond it keep only their inputs and
    # are recomputed in the (double) backward. 0 → recompute every chunk.
    edge_memory_mb: float = 4096.0
    focus_temperature: float = 1.0
    focus_smoothing: float = 0.02
    # ε of the scalar RMSNorms (radial MLP, FiLM scale/shift, attention input, focus competition): deepmd-kit's 1e-7;
    # model configs saved before 2026-12-03 had 1e-5 (models.options_saved_before)
    rms_eps: float = 1e-7
    null_eps: float = 1e-7  # added to the attention null mass softplus(ζ) (deepmd-kit); 0 before 2026-12-03
    # "shared": one RMSNorm on the attention input feeds Q/K and the output gate; "split": one each, as deepmd-kit
    attention_norms: Literal["shared", "split"] = "shared"
    # deepmd-kit's descriptor readout d = x₀ + W₂ (W₁ᵃ x₀ ⊙ SiLU(W₁ᵍ x₀)) on the scalars, shared by every head
    readout_ffn: bool = False
    readout_ffn_hidden: int = 0  # 0 → 32·⌈(8/3)·C/32⌉

    def __post_init__(self) -> None:
        for key in ("n_blocks", "so2_layers", "n_focus", "rank"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.edge_chunk < 0:
            raise ValueError(f"edge_chunk: must be >= 0 (0: no chunking), got {self.edge_chunk}")
        if self.edge_memory_mb < 0:
            raise ValueError(f"edge_memory_mb: must be >= 0 (0: recompute every chunk), got {self.edge_memory_mb}")
        for key in ("rms_eps", "null_eps"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if not 1 <= self.mmax <= self.lmax:
            raise ValueError(f"mmax: needs 1 <= mmax <= lmax, got mmax={self.mmax}, lmax={self.lmax}")

    @property
    def focus_channels(self) -> int:
        return self.focus_dim or self.channels

    @property
    def hidden_channels(self) -> int:
        """H = F·C_f, the width inside the SO(2) convolution."""
        return self.n_focus * self.focus_channels

    @property
    def readout_channels(self) -> int:
        return self.readout_ffn_hidden or 32 * math.ceil(8 * self.channels / 3 / 32)

    @property
    def ffn_channels(self) -> int:
        return self.ffn_hidden or 32 * math.ceil(8 * self.channels / 3 / 32)


SIZES = {
    "dpa4-neo": DPA4Config(n_blocks=2, so2_layers=3, lmax=3),
    "dpa4-air": DPA4Config(n_blocks=3, so2_layers=4, lmax=3),
    "dpa4-plus": DPA4Config(n_blocks=4, so2_layers=4, lmax=4),
    "dpa4-pro": DPA4Config(n_blocks=6, so2_layers=4, lmax=5, n_focus=2, rank=2),
}


def configure(base: DPA4Config, **overrides) -> DPA4Config:
    """``base`` with keyword overrides, validated by the one config validator (key, type, range)."""
    return override(base, overrides)
