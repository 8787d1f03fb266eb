"""Engines: one small interface over DDP, FSDP2 and DeepSpeed ZeRO-1/2/3.

The trainer only ever calls these methods, so its loop is the same for every
strategy::

    with engine.gradient_sync(last_micro):  # reduce gradients only on the last micro-batch
        out = engine.forward(batch)          # model(batch): the model's training outputs (a dict of tensors)
        engine.backward(loss)
    norm = engine.step(max_norm)             # clip, optimizer step, zero grads; returns the grad norm

All three train conservative forces: the model's forward takes
``autograd.grad(E, x, create_graph=True)`` and the loss backward goes through
that graph (double backward). Each adapter documents what makes that work.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from ...graph.batch import GraphBatch

OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


class Engine:
    """Base adapter: ``module`` is the (possibly sharded) model, ``optimizer`` steps it."""

    name = "base"

    def __init__(self, module: torch.nn.Module, device: torch.device, autocast: torch.dtype | None):
        self.module = module
        self.device = device
        self.autocast = autocast
        self.optimizer: torch.optim.Optimizer
        self.params: list[torch.nn.Parameter] = []  # what the optimizer steps

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def forward(self, batch: GraphBatch) -> dict[str, torch.Tensor]:
        """``model(batch)``: whatever the model computes by default (MultiTaskModel: energy, forces, stress; a
        property model: its property), so one loop trains any model that returns a dict of tensors."""
        with self._autocast():
            return self.wrapped(batch)

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[torch.nn.Module]:
        """The bare module in eval mode under the engine's autocast, for forwards that never go backward
        (validation): no gradient-sync wrapper sees them, so they leave the next training step's
        gradient reduction alone."""
        training = self.module.training
        self.module.eval()
        try:
            with self._autocast():
                yield self.module
        finally:
            self.module.train(training)

    def gradient_sync(self, sync: bool):
        """Context for one micro-batch's forward and backward; ``sync=False`` skips the gradient reduction."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_norm: float | None) -> torch.Tensor:
        norm = grad_norm_and_clip(self.params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def close(self) -> None:
        """Release what the engine registered (hooks, buffers) while the process group still exists."""

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # layer-wise decay (TrainHooks.lr_scales)

    def named_parameters(self) -> dict[str, torch.Tensor]:
        """Trainable parameters by their unwrapped names (what EMA averages)."""
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def full_tensors(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors shaped like :meth:`named_parameters` (e.g. EMA shadows) as full parameters, for checkpoints
        that inference reads by name. The same tensors except under ZeRO-3, whose ranks hold partitions."""
        return local

    def load_local_(self, local: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`full_tensors`: fill ``local`` from the loaded ``full`` (nothing to do when they are
        the same tensors, which the checkpoint loader filled in place)."""

    def state_tensors(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tensors for torch.distributed.checkpoint, JSON-able extras) of model and optimizer."""
        raise NotImplementedError

    def load_state_tensors(self, tensors: dict[str, Any], extras: dict[str, Any]) -> None:
        """Install what :meth:`state_tensors` returned after ``dcp.load`` filled its tensors in place."""
        raise NotImplementedError


def grad_norm_and_clip(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Total L2 norm of the gradients (clipped to ``max_norm`` when given), as a tensor (no host sync)."""
    grads = [p for p in params if p.grad is not None]
    if max_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(grads, max_norm, foreach=True)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in grads], foreach=True)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return norm


def make_engine(
    name: str,
    module: torch.nn.Module,
    optimizer_factory: OptimizerFactory,
    device: torch.device,
    autocast: torch.dtype | None,
    grad_accum: int = 1,
    zero_stage: int = 2,
    max_norm: float | None = None,
    deepspeed_config: dict[str, Any] | None = None,
    find_unused_parameters: bool = False,
) -> Engine:
    if name == "ddp":
        from .ddp import DDPEngine

        return DDPEngine(module, optimizer_factory, device, autocast, find_unused_parameters)
    if name == "fsdp":
        from .fsdp import FSDPEngine

        return FSDPEngine(module, optimizer_factory, device, autocast)
    if name == "deepspeed":
        from .deepspeed import DeepSpeedEngineAdapter
        from .deepspeed_zero3 import DeepSpeedZero3Adapter

        adapter = DeepSpeedZero3Adapter if zero_stage == 3 else DeepSpeedEngineAdapter
        return adapter(
            module, optimizer_factory, device, autocast, grad_accum, zero_stage, max_norm, deepspeed_config or {}
        )
    raise ValueError(f"unknown engine '{name}'; allowed: ddp, fsdp, deepspeed")
