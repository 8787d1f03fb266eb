"""Dataset mixing, the per-structure cost model and the rank-balanced distributed batch sampler."""

from .balanced import BalancedBatchSampler, EpochPlan, OversizeWarning
from .cost import CostModel
from .mixing import dataset_weights, effective_mix, epoch_counts, mix_table, weights_from_mapping
from .stream import StreamBatchSampler

__all__ = [
    "BalancedBatchSampler",
    "CostModel",
    "EpochPlan",
    "OversizeWarning",
    "StreamBatchSampler",
    "dataset_weights",
    "effective_mix",
    "epoch_counts",
    "mix_table",
    "weights_from_mapping",
]
