"""Training objectives: masked per-dataset losses, loss balancing and the DeNS denoising term."""

from .balancing import BALANCING, LossBalancer
from .losses import energy_per_atom_error, force_error, magmom_error, masked_group_mean, stress_error
from .objective import TASKS, MultiTaskObjective, ObjectiveConfig

__all__ = [
    "BALANCING",
    "TASKS",
    "LossBalancer",
    "MultiTaskObjective",
    "ObjectiveConfig",
    "energy_per_atom_error",
    "force_error",
    "magmom_error",
    "masked_group_mean",
    "stress_error",
]
