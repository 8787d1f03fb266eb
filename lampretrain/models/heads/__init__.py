"""Heads on a shared backbone: per-dataset energies and references, vector heads, DeNS corruption."""

from .denoising import Corruption, DenoisingConfig, sample_corruption
from .energy import ElementReferences, EnergyHeads, StackedMLP, clamp_to_median, reference_table, select_head
from .vector import EdgeVectorHead, EquivariantVectorHead, VectorCondition

__all__ = [
    "Corruption",
    "DenoisingConfig",
    "EdgeVectorHead",
    "ElementReferences",
    "EnergyHeads",
    "EquivariantVectorHead",
    "StackedMLP",
    "VectorCondition",
    "clamp_to_median",
    "reference_table",
    "sample_corruption",
    "select_head",
]
