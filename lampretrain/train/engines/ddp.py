"""DistributedDataParallel.

Double backward works without special handling: the inner
``autograd.grad(E, x, create_graph=True)`` inside forward asks only for
∂E/∂x, so no parameter's AccumulateGrad fires and DDP's reducer hooks stay
quiet until the loss backward, which reduces each gradient bucket once.
Parameters that never reach the loss (MatRIS's last bond/line-graph update,
whose output no later layer reads) need ``find_unused_parameters=True``
(recipe ``engine.find_unused_parameters``); it costs one graph traversal per
forward and also works through the force graph.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch.nn.parallel import DistributedDataParallel

from . import Engine, OptimizerFactory
from ._dcp_state import load_model_optimizer_state, model_optimizer_state

# Buffers are not broadcast before each forward: every buffer of the models and objectives is a constant that each
# rank computes alike (element references, bases, grids). torch 2.13 renamed the switch and warns (FutureWarning) on
# the old name; its new one still syncs buffers once at construction, as it does the parameters, which is harmless
# for buffers that are equal on every rank.
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


class DDPEngine(Engine):
    name = "ddp"

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer_factory: OptimizerFactory,
        device: torch.device,
        autocast,
        find_unused_parameters: bool = False,
    ):
        super().__init__(module.to(device), device, autocast)
        ids = [device.index] if device.type == "cuda" else None
        self.wrapped = DistributedDataParallel(
            self.module, device_ids=ids, find_unused_parameters=find_unused_parameters, **_NO_BUFFER_SYNC
        )
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = optimizer_factory(self.params)

    def gradient_sync(self, sync: bool):
        return contextlib.nullcontext() if sync else self.wrapped.no_sync()

    def state_tensors(self):
        return model_optimizer_state(self.module, self.optimizer)

    def load_state_tensors(self, tensors, extras) -> None:
        load_model_optimizer_state(self.module, self.optimizer, tensors, extras)
