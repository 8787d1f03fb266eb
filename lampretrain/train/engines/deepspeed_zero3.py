"""DeepSpeed ZeRO-3: parameters, gradients and optimizer state partitioned across ranks, with conservative forces.

Why ZeRO-3 needs care: it gathers a module's parameters in a forward
pre-hook and partitions them again (size-0 ``param.data``) when a backward
pass through the module ends. The force F = −∂E/∂x is such a backward pass
*inside* forward (``autograd.grad(E, x, create_graph=True)``), so with the
default per-module hooks every module is re-partitioned before the loss
backward walks the saved double-backward graph, which then meets parameters
of size 0 (DeepSpeed issues #3539/#7352; measured on MatRIS: 93 of 107
parameters released, ``NativeLayerNormBackwardBackward0`` shape error).

The fix here, the ZeRO-3 counterpart of the FSDP2 adapter's single unit:
the model is wrapped in one module marked as a ZeRO-3 *leaf*
(``deepspeed.utils.set_z3_leaf_module``), so DeepSpeed hooks only that root.
Its pre-forward gathers every parameter at once; the inner force gradient
then runs with nothing hooked inside; the post-forward partitions the
parameters; the loss backward enters through the root's outputs, whose
pre-backward hook gathers them again for the double backward; the optimizer
step partitions them (``_partition_all_parameters``). At rest, and while the
loader, logging and checkpointing run, each rank holds 1/N of the parameters.

DeepSpeed reduces a leaf module's gradients when the gradients of the
leaf's inputs arrive. Ours would be the positions, whose gradient the inner
force computation produces in the middle of forward, before any parameter
has a gradient. So the root takes an unused ``anchor`` input (its hook never
fires) and each output carries an identity function whose backward queues
the reduce-scatter of every gradient for the end of the loss backward
(``queue_callback``: after all parameter gradients have accumulated).

``stage3_param_persistence_threshold`` is fixed at 0: all parameters are
fetched together anyway, and one layout (every parameter partitioned) keeps
EMA and checkpoints simple. EMA averages each rank's partitions; checkpoints
hold the full model and EMA (gathered, what inference and fine-tuning read
by name) plus each rank's fp32 master partitions and Adam moments.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from .deepspeed import DeepSpeedEngineAdapter


class _AtBackwardEnd(torch.autograd.Function):
    """Identity on a model output whose backward calls ``fn`` (here: queue the gradient reduce-scatter for the end of
    the backward pass)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[[], None]) -> torch.Tensor:
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.fn()
        return grad, None


class _LeafRoot(torch.nn.Module):
    """The model as one ZeRO-3 leaf: parameters gathered for the whole forward, inner gradient included."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        import deepspeed

        self.model = model
        self.reduce: Callable[[], None] = lambda: None  # set once the ZeRO-3 optimizer exists
        self._queued = False
        deepspeed.utils.set_z3_leaf_module(self, True)

    def _queue_reduce(self) -> None:
        if not self._queued:  # the loss may reach several outputs
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._reduce_now)

    def _reduce_now(self) -> None:
        self._queued = False
        self.reduce()

    def forward(self, batch, anchor: torch.Tensor) -> dict[str, Any]:
        out = self.model(batch)
        return {k: _AtBackwardEnd.apply(v, self._queue_reduce) if torch.is_tensor(v) and v.requires_grad else v
                for k, v in out.items()}


class DeepSpeedZero3Adapter(DeepSpeedEngineAdapter):
    name = "deepspeed"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.root.reduce = self._reduce_gradients
        self._all = dict(self.module.named_parameters())
        self._zero_padding()

    @torch.no_grad()
    def _zero_padding(self) -> None:
        """DeepSpeed leaves the padding at the end of the last rank's partitions uninitialised; zeros make
        checkpoints reproducible (bitwise resume) and keep garbage out of the fp32 master weights."""
        rank = dist.get_rank()
        for params, fp32 in zip(self.optimizer.fp16_groups, self.optimizer.fp32_partitioned_groups_flat):
            offset = 0
            for p in params:
                size = p.ds_tensor.numel()
                valid = max(0, min(size, p.ds_numel - rank * size))
                p.ds_tensor.data[valid:].zero_()
                fp32[offset + valid : offset + size].zero_()
                offset += size

    def engine_module(self) -> torch.nn.Module:
        self.root = _LeafRoot(self.module)
        return self.root

    def zero_config(self, stage: int, user: dict[str, Any]) -> dict[str, Any]:
        if user.get("stage3_param_persistence_threshold", 0) != 0:
            raise ValueError("engine.deepspeed.zero_optimization.stage3_param_persistence_threshold must be 0 "
                             "(lampretrain gathers all parameters together; see train/engines/deepspeed_zero3.py)")
        return {**user, "stage": stage, "stage3_param_persistence_threshold": 0}

    def _reduce_gradients(self) -> None:
        for p in self.params:
            if p.grad is None:  # a parameter the loss did not reach still takes part in the reduce-scatter
                p.grad = torch.zeros_like(p)
            self.optimizer.reduce_ready_partitions_and_remove_grads(p)

    def forward(self, batch) -> dict[str, torch.Tensor]:
        anchor = torch.zeros((), device=self.device, requires_grad=True)
        with self._autocast():
            return self.wrapped(batch, anchor)

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[torch.nn.Module]:
        """All parameters gathered for the whole evaluation; the bare model runs with no ZeRO hook."""
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self._all.values())), super().evaluation() as module:
            yield module

    def named_parameters(self) -> dict[str, torch.Tensor]:
        """This rank's partition of each trainable parameter (flat, zero-padded): EMA is sharded too."""
        return {n: p.ds_tensor for n, p in self._all.items() if p.requires_grad}

    def full_tensors(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: self._gather(self._all[n], t) for n, t in local.items()}

    @torch.no_grad()
    def load_local_(self, local: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> None:
        for n, t in local.items():
            t.copy_(self._slice(self._all[n], full[n]))

    @staticmethod
    def _gather(p: torch.nn.Parameter, part: torch.Tensor) -> torch.Tensor:
        """Full parameter-shaped tensor from every rank's partition ``part`` of ``p``."""
        parts = [torch.empty_like(part) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, part.contiguous())
        return torch.cat(parts)[: p.ds_numel].view(p.ds_shape)

    @staticmethod
    def _slice(p: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
        """This rank's partition of a full tensor shaped like ``p`` (ZeRO-3's flat, zero-padded layout)."""
        size = p.ds_tensor.numel()
        flat = full.reshape(-1).to(p.ds_tensor.dtype)
        out = torch.zeros(size, dtype=flat.dtype, device=p.ds_tensor.device)
        piece = flat[dist.get_rank() * size : (dist.get_rank() + 1) * size]
        out[: piece.numel()] = piece
        return out

    def _partitions(self) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        zero = self.optimizer
        out = []
        for fp32 in zero.fp32_partitioned_groups_flat:
            state = zero.optimizer.state[fp32]
            if not state:
                state.update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(fp32), exp_avg_sq=torch.zeros_like(fp32))
            out.append((fp32, state))
        return out

    def state_tensors(self):
        tensors, extras = super().state_tensors()
        full = self.full_tensors({n: p.ds_tensor for n, p in self._all.items()})
        tensors["model"] = {**tensors["model"], **full}  # buffers stay whole under ZeRO-3
        return tensors, extras

    @torch.no_grad()
    def load_state_tensors(self, tensors, extras) -> None:
        model = tensors["model"]
        for n, p in self._all.items():
            p.ds_tensor.copy_(self._slice(p, model[n]))
        buffers = {n for n, _ in self.module.named_buffers()}
        self.module.load_state_dict({n: v for n, v in model.items() if n in buffers}, strict=False)
        for group, saved in zip(self.optimizer.param_groups, extras["param_groups"]):
            for key, value in saved.items():
                group[key] = tuple(value) if key == "betas" else value
