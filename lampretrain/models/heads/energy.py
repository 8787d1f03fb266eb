"""Per-dataset energy heads and element reference energies, selected per atom by the graph's dataset.

All K heads run as one stacked product and each atom keeps the output of its
own dataset's head (compute-all-then-gather). The alternative, gathering a
weight matrix per atom, materialises an (N, C, H) tensor and is far slower;
sorting atoms by dataset for a grouped GEMM needs a host sync for the group
sizes. The heads are a few percent of a backbone's FLOPs, so computing K of
them for every atom costs little while keeping one fused kernel and no sync.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

MAX_Z = 118


class StackedMLP(torch.nn.Module):
    """K independent MLPs (SiLU between layers) evaluated together: (N, C) → (N, K, out).

    ``glu``: every hidden layer of width H is a GLU, as deepmd-kit's DPA4 fitting net: the linear map gives 2H
    values [a ‖ g] and the layer outputs a ⊙ SiLU(g).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, n_heads: int, glu: bool = False):
        super().__init__()
        dims = [in_dim, *hidden, out_dim]
        self.n_heads = n_heads
        self.glu = glu
        self.weights = torch.nn.ParameterList()
        self.biases = torch.nn.ParameterList()
        for k, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            width = 2 * b if glu and k < len(hidden) else b
            bound = 1.0 / math.sqrt(a)  # torch.nn.Linear's default range
            self.weights.append(torch.nn.Parameter(torch.empty(n_heads, a, width).uniform_(-bound, bound)))
            self.biases.append(torch.nn.Parameter(torch.empty(n_heads, width).uniform_(-bound, bound)))

    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        if self.glu:
            value, gate = h.chunk(2, dim=-1)
            return value * F.silu(gate)
        return F.silu(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w0, b0 = self.weights[0], self.biases[0]
        # first layer as one (N, C) × (C, K·H) product
        h = (x @ w0.permute(1, 0, 2).flatten(1)).unflatten(-1, (self.n_heads, -1)) + b0  # (N, K, H)
        for w, b in zip(self.weights[1:], self.biases[1:]):
            h = torch.einsum("nki,kio->nko", self._activation(h), w) + b
        return h


def select_head(values: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """values (N, K, ...) → (N, ...): row n keeps head ``head[n]``."""
    index = head.view(-1, 1, *([1] * (values.dim() - 2))).expand(-1, 1, *values.shape[2:])
    return values.gather(1, index).squeeze(1)


def reference_table(references: Sequence[Mapping[int, float]]) -> torch.Tensor:
    """(K, 119) float64 table, row k: eV per atom of element Z for dataset k (0 where not fitted)."""
    table = torch.zeros(len(references), MAX_Z + 1, dtype=torch.float64)
    for k, refs in enumerate(references):
        for z, value in refs.items():
            if not 1 <= int(z) <= MAX_Z:
                raise ValueError(f"element reference for dataset #{k}: atomic number {z} outside 1..{MAX_Z}")
            table[k, int(z)] = float(value)
    return table


class ElementReferences(torch.nn.Module):
    """E_ref,g = Σ_{i∈g} ref[k(g), Z_i] in float64; frozen buffer or trainable parameter."""

    def __init__(self, table: torch.Tensor, trainable: bool = False):
        super().__init__()
        table = table.to(torch.float64)
        if trainable:
            self.table = torch.nn.Parameter(table)
        else:
            self.register_buffer("table", table)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts every floating tensor: a float32 table would round the references and sum
        # hundreds of them in float32 (≈1e-6 eV/atom on a 100-atom cell); a device move still applies
        before = self.table.detach()
        super()._apply(fn, recurse)
        if self.table.dtype != torch.float64:
            self.table.data = before.to(self.table.device)
        return self

    def forward(self, numbers: torch.Tensor, atom_dataset: torch.Tensor) -> torch.Tensor:
        """Per-atom reference energies (N,) float64."""
        return self.table[atom_dataset, numbers]


def clamp_to_median(scales: torch.Tensor, max_ratio: float) -> torch.Tensor:
    """s_kt clamped to [s̄_t / R, s̄_t · R], s̄_t = exp(median_k log s_kt) per column t; scales (K, T) or (K,) > 0.

    Per-dataset statistics of a handful of frames or of relaxed structures (force RMS
    ≈ 0.01 eV/Å) would otherwise set a scale 100–1000× away from every other dataset's.
    """
    center = scales.log().quantile(0.5, dim=0).exp()
    return torch.minimum(torch.maximum(scales, center / max_ratio), center * max_ratio)


class EnergyHeads(torch.nn.Module):
    """Per-atom energies (N,) from invariant features (N, C): s_k(i) · head_k(i)(h_i), head k of K or one shared.

    s_k is dataset k's force RMS (clamped within 10× of the median over datasets), as MACE
    scales its readout: an O(1) head output then gives forces of the dataset's own size
    (4.7 eV/Å for the CHO molecules, 0.9 for the mlearn crystals) at initialisation.
    """

    def __init__(
        self, channels: int, hidden: Sequence[int], scales: torch.Tensor, per_dataset: bool = True, glu: bool = False
    ):
        super().__init__()
        self.per_dataset = per_dataset
        self.mlp = StackedMLP(channels, hidden, 1, scales.numel() if per_dataset else 1, glu=glu)
        self.register_buffer("scale", scales.to(torch.float32))  # (K,)

    def forward(self, features: torch.Tensor, atom_dataset: torch.Tensor) -> torch.Tensor:
        out = self.mlp(features).squeeze(-1)  # (N, K)
        scale = self.scale.to(out.dtype).index_select(0, atom_dataset)  # (N,)
        if not self.per_dataset:
            return out[:, 0] * scale
        return select_head(out, atom_dataset) * scale
