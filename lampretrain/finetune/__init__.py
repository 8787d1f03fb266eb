"""Fine-tuning pretrained checkpoints (change-bias, new heads, freezing, LR decay, replay, LoRA) and Ray Tune sweeps."""

from .recipe import FinetuneRecipe, load_finetune, parse_finetune
from .run import FinetuneResult, finetune

__all__ = ["FinetuneRecipe", "FinetuneResult", "finetune", "load_finetune", "parse_finetune"]
