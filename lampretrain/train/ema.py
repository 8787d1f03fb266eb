"""Exponential moving average of the weights: θ̄ ← d·θ̄ + (1 − d)·θ after every optimizer step.

The shadow tensors are clones of the parameters with the same placement
(plain tensors under DDP and DeepSpeed ZeRO-1/2, DTensor shards under FSDP2),
so the average costs no communication and checkpoints like the model.
"""

from __future__ import annotations

import torch


class EMA:
    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.params = params
        self.shadow = {name: p.detach().clone() for name, p in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        names = list(self.shadow)
        shadow = [self.shadow[n] for n in names]
        current = [self.params[n].detach() for n in names]
        torch._foreach_lerp_(shadow, current, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    @torch.no_grad()
    def copy_to(self, params: dict[str, torch.Tensor]) -> None:
        """Write the averaged weights into ``params`` (for evaluation or export)."""
        for name, value in self.shadow.items():
            params[name].copy_(value)
