"""Dataset mixing, the per-structure cost model and the rank-balanced distributed batch sampler."""

from .balanced import BalancedBatchSampler, EpochPlan, OversizeWarning, plan_epoch
from .cost import CostModel
from .mixing import dataset_weights, draw_epoch, effective_mix, epoch_counts, weights_from_mapping

__all__ = [
    "BalancedBatchSampler",
    "CostModel",
    "EpochPlan",
    "OversizeWarning",
    "dataset_weights",
    "draw_epoch",
    "effective_mix",
    "epoch_counts",
    "plan_epoch",
    "weights_from_mapping",
]
