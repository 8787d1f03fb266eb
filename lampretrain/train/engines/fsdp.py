"""FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimizer state sharded.

Why double backward needs care here: FSDP2 frees the unsharded parameters
of a sharded unit when that unit's forward ends (``reshard_after_forward``)
and again after its backward hooks run. The force computation
``autograd.grad(E, x, create_graph=True)`` is itself a backward pass: with
per-block units it fires the blocks' pre/post-backward hooks *inside*
forward, the blocks reshard, and the loss backward then walks the saved
double-backward graph whose parameter tensors have storage of size 0
(``setStorage ... storage of size 0``).

The fix used here: the model is one FSDP unit (``fully_shard`` on the root
only) with ``reshard_after_forward=False``. The inner gradient runs inside
the root forward while the parameters are gathered, and no unit hook fires
in between (hooks sit on the root's outputs, which exist only after the
forces are computed); the loss backward enters through those outputs, so the
gradient is reduce-scattered and the parameters resharded exactly once, at
the end of the real backward. Memory at rest (between steps) is sharded
like ZeRO-3; during a step the full model is gathered, which is what a
force-trained model of up to a few hundred million parameters affords.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from . import Engine, OptimizerFactory
from ._dcp_state import load_model_optimizer_state, model_optimizer_state


class FSDPEngine(Engine):
    name = "fsdp"

    def __init__(self, module: torch.nn.Module, optimizer_factory: OptimizerFactory, device: torch.device, autocast):
        super().__init__(module.to(device), device, autocast)
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        fully_shard(self.module, mesh=mesh, reshard_after_forward=False)
        self.wrapped = self.module
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = optimizer_factory(self.params)

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[torch.nn.Module]:
        """Parameters gathered once for the whole evaluation (ranks may run different numbers of batches,
        so no forward may all-gather), sharded again after."""
        self.module.unshard()
        try:
            with super().evaluation() as module:
                yield module
        finally:
            self.module.reshard()

    def gradient_sync(self, sync: bool):
        self.module.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def state_tensors(self):
        return model_optimizer_state(self.module, self.optimizer)

    def load_state_tensors(self, tensors, extras) -> None:
        load_model_optimizer_state(self.module, self.optimizer, tensors, extras)
