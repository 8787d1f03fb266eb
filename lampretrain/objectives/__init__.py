"""Training objectives: the error metrics, masked per-dataset losses, loss balancing and the DeNS denoising term."""

from .balancing import BALANCING, LossBalancer
from .metrics import METRICS, Metric
from .objective import LOSS_METRICS, TASKS, MultiTaskObjective, ObjectiveConfig

__all__ = [
    "BALANCING",
    "LOSS_METRICS",
    "METRICS",
    "TASKS",
    "LossBalancer",
    "Metric",
    "MultiTaskObjective",
    "ObjectiveConfig",
]
