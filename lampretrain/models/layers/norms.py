"""Normalisation layers chosen by name in model configurations."""

from __future__ import annotations

import torch

NORMS = ("layer", "rms")


def make_norm(kind: str, dim: int) -> torch.nn.Module:
    """LayerNorm (``"layer"``, weight and bias) or RMSNorm (``"rms"``, weight only) over the last ``dim`` channels."""
    if kind == "layer":
        return torch.nn.LayerNorm(dim)
    if kind == "rms":
        return torch.nn.RMSNorm(dim)
    raise ValueError(f"unknown norm '{kind}'; allowed: {', '.join(NORMS)}")
