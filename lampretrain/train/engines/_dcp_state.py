"""Model and optimizer state through ``torch.distributed.checkpoint.state_dict`` (DDP and FSDP2 alike).

Only tensors go into the checkpoint files; the optimizer's param_groups
(learning rates, betas, ...) are plain numbers kept as JSON, so loading never
unpickles anything.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def model_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    opts = StateDictOptions(ignore_frozen_params=False)
    tensors = {
        "model": get_model_state_dict(model, options=opts),
        "optim": get_optimizer_state_dict(model, optimizer, options=opts)["state"],
    }
    groups = get_optimizer_state_dict(model, optimizer, options=opts)["param_groups"]
    extras = {"param_groups": [{k: _jsonable(v) for k, v in g.items()} for g in groups]}
    return tensors, extras


def load_model_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict, extras: dict
) -> None:
    opts = StateDictOptions(ignore_frozen_params=False)
    set_model_state_dict(model, tensors["model"], options=opts)
    groups = [dict(g) for g in extras["param_groups"]]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    # not strict: a parameter without a gradient before the save has no AdamW state (checkpoint.load(sparse=))
    set_optimizer_state_dict(model, optimizer, {"state": tensors["optim"], "param_groups": groups},
                             options=StateDictOptions(ignore_frozen_params=False, strict=False))
