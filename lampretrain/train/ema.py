"""Exponential moving average of the weights: θ̄ ← d_t·θ̄ + (1 − d_t)·θ after optimizer step t.

d_t = min(d, (1 + t)/(10 + t)) (the ``num_updates`` warmup of TensorFlow's
ExponentialMovingAverage): with a fixed d the average keeps d^t of the random
initial weights, 22% after 150 steps at d = 0.99, which leaves a short run's
averaged model no better than its initialisation. d_t depends on the step only,
so a resumed run needs no extra state.

The shadow tensors are clones of the parameters with the same placement
(plain tensors under DDP and DeepSpeed ZeRO-1/2, DTensor shards under FSDP2),
so the average costs no communication and checkpoints like the model.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class EMA:
    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.params = params
        self.shadow = {name: p.detach().clone() for name, p in params.items()}

    def decay_at(self, step: int) -> float:
        """d_t = min(d, (1 + t)/(10 + t)) for the update after ``step`` earlier optimizer steps."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average in the current weights; ``step``: optimizer steps taken before this one (0 for the first)."""
        names = list(self.shadow)
        shadow = [self.shadow[n] for n in names]
        current = [self.params[n].detach() for n in names]
        torch._foreach_lerp_(shadow, current, 1.0 - self.decay_at(step))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    @torch.no_grad()
    def copy_to(self, params: dict[str, torch.Tensor]) -> None:
        """Write the averaged weights into ``params`` (for evaluation or export)."""
        for name, value in self.shadow.items():
            params[name].copy_(value)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in place of the live ones for the duration (validation), the live ones after."""
        names = list(self.shadow)
        live = [self.params[n].detach().clone() for n in names]
        self.copy_to(self.params)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in zip(names, live):
                    self.params[name].copy_(value)
