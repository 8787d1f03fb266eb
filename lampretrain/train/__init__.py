"""Distributed pretraining: the loop (trainer), engines (DDP, FSDP2, DeepSpeed), checkpoints, tracking."""

from .trainer import RunResult, pretrain

__all__ = ["RunResult", "pretrain"]
