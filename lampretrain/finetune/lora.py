"""LoRA adapters on a backbone's linear layers, folded back into the weights at export.

y = W x + b + (α/r)·B(A x), A (r, in) small random, B (out, r) zero, so at step 0 the
model is exactly the pretrained one; W and b are frozen and only A, B train.
Folding writes W ← W + (α/r)·B A and puts the plain ``nn.Linear`` back.
"""

from __future__ import annotations

import math

import torch


class LoRALinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = torch.nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        torch.nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's own init

    @property
    def weight(self) -> torch.Tensor:
        """W + (α/r)·B A, (out, in): backbones that read ``.weight`` for fused products see the adapted one."""
        return self.base.weight + self.scale * (self.lora_b @ self.lora_a)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def folded(self) -> torch.nn.Linear:
        """The equivalent plain linear layer: W + (α/r)·B A."""
        with torch.no_grad():
            self.base.weight.copy_(self.weight)
        return self.base


def add_lora(module: torch.nn.Module, rank: int, alpha: float) -> int:
    """Wrap every trainable ``nn.Linear`` under ``module`` in place; returns how many were wrapped."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear) and child.weight.requires_grad:
            setattr(module, name, LoRALinear(child, rank, alpha))
            count += 1
        elif not isinstance(child, LoRALinear):
            count += add_lora(child, rank, alpha)
    return count


def fold_lora(module: torch.nn.Module) -> int:
    """Replace every :class:`LoRALinear` under ``module`` by its folded ``nn.Linear``; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, LoRALinear):
            setattr(module, name, child.folded().requires_grad_(True))
            count += 1
        else:
            count += fold_lora(child)
    return count
