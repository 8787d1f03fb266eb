"""DeepSpeed ZeRO stages 1 and 2 (optimizer state, and gradients, sharded across ranks).

Double backward: the model's forward calls ``autograd.grad(E, x,
create_graph=True)``. deepspeed 0.18+ registers gradient-accumulation hooks
that also run for that inner gradient and fail (IndexError in
``run_grad_acc_post_hooks``); 0.17.6 handles it, hence the pin in
pyproject's ``deepspeed`` extra. The inner gradient asks only for ∂E/∂x,
so ZeRO's per-parameter reduce hooks fire once, in the loss backward.

ZeRO-2 with gradient accumulation is refused (:data:`lampretrain.recipe.ZERO2_ACCUMULATION`, also checked when a recipe is read):
in 0.17.6 the stage-2 backward epilogue rebuilds its list of this rank's
gradient partitions at every micro-step before the boundary instead of
adding to it, so only the last micro-batch's gradient reaches the step
(measured on 2 ranks: with the loss on the first of two micro-batches only,
the gradient norm is 0; with both, half of DDP's). ZeRO-1 and ZeRO-3
accumulate correctly (tested against DDP).

ZeRO-3 lives in :mod:`.deepspeed_zero3` (it needs the inner gradient kept
away from ZeRO-3's per-module parameter release).

Checkpoints stay in torch.distributed.checkpoint: the full module state
(replicated under ZeRO-1/2, written once) plus, per rank, the flat fp32
master partition of each parameter group and its Adam moments. DeepSpeed's
own ``save_checkpoint`` pickles Python objects, which this project never
loads.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ...recipe import ZERO2_ACCUMULATION
from . import Engine, OptimizerFactory


class DeepSpeedEngineAdapter(Engine):
    name = "deepspeed"

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer_factory: OptimizerFactory,
        device: torch.device,
        autocast,
        grad_accum: int,
        zero_stage: int,
        max_norm: float | None,
        extra: dict[str, Any],
    ):
        if zero_stage == 2 and grad_accum > 1:
            raise ValueError(ZERO2_ACCUMULATION.format(grad_accum=grad_accum))
        import deepspeed

        super().__init__(module.to(device), device, autocast)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": grad_accum,
            "zero_optimization": self.zero_config(zero_stage, extra.get("zero_optimization", {})),
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": float(max_norm or 0.0),
            "steps_per_print": 2**31 - 1,
        }
        config.update({k: v for k, v in extra.items() if k != "zero_optimization"})
        self.wrapped, self.optimizer, _, _ = deepspeed.initialize(
            model=self.engine_module(), optimizer=optimizer_factory(self.params), config=config,
            dist_init_required=False,
        )
        self.zero_stage = zero_stage

    def zero_config(self, stage: int, user: dict[str, Any]) -> dict[str, Any]:
        """The ``zero_optimization`` section: the recipe's stage over the user's extra settings."""
        return {**user, "stage": stage}

    def engine_module(self) -> torch.nn.Module:
        """What ``deepspeed.initialize`` wraps."""
        return self.module

    def close(self) -> None:
        self.wrapped.destroy()
        # DeepSpeedEngine.__del__ calls destroy() again at garbage collection, when the process group may be gone
        self.wrapped.destroy = lambda: None

    def gradient_sync(self, sync: bool):
        self.wrapped.set_gradient_accumulation_boundary(sync)
        return super().gradient_sync(sync)

    def backward(self, loss: torch.Tensor) -> None:
        self.wrapped.backward(loss, scale_wrt_gas=False)  # the trainer already divides by grad_accum

    def step(self, max_norm: float | None) -> torch.Tensor:
        self.wrapped.step()  # clipping by the config's gradient_clipping
        norm = self.wrapped.get_global_grad_norm()
        return torch.as_tensor(0.0 if norm is None else norm, dtype=torch.float32)

    def _partitions(self) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """(fp32 master partition, its base-optimizer state) per parameter group, this rank's shard."""
        zero = self.optimizer
        out = []
        for fp32 in zero.single_partition_of_fp32_groups:
            state = zero.optimizer.state[fp32]
            if not state:  # before the first step: allocate so checkpoint loading can fill in place
                state.update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(fp32), exp_avg_sq=torch.zeros_like(fp32))
            out.append((fp32, state))
        return out

    def state_tensors(self):
        rank = dist.get_rank()
        zero = {}
        for g, (fp32, state) in enumerate(self._partitions()):
            zero[f"rank{rank}/group{g}/fp32"] = fp32.data
            for key, value in state.items():
                zero[f"rank{rank}/group{g}/{key}"] = value
        groups = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        extras = {"param_groups": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in groups]}
        return {"model": self.module.state_dict(), "zero": zero}, extras

    def load_state_tensors(self, tensors, extras) -> None:
        # dcp.load filled the module's own tensors and the partitions in place; re-install for clarity
        self.module.load_state_dict(tensors["model"])
        for group, saved in zip(self.optimizer.param_groups, extras["param_groups"]):
            for key, value in saved.items():
                group[key] = tuple(value) if key == "betas" else value
