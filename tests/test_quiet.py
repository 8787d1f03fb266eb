"""Normal paths print no third-party warnings: building the DDP engine, saving a checkpoint, loading it back in a
process without a process group (what evaluate, export and the calculator do)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from lampretrain.train import checkpoint as ckpt
from lampretrain.train.engines.ddp import DDPEngine

from finetune_support import free_port


class WithBuffer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)
        self.register_buffer("scale", torch.full((1,), 2.0))  # a constant, as every model buffer is

    def forward(self, x):
        return self.linear(x) * self.scale


def test_ddp_engine_checkpoint_save_and_load_warn_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    torch.manual_seed(0)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            engine = DDPEngine(WithBuffer(), lambda params: torch.optim.SGD(params, lr=0.1), torch.device("cpu"), None)
            engine.wrapped(torch.ones(2, 3)).sum().backward()
            saved = ckpt.save(tmp_path, 1, {"model": engine.module.state_dict()}, {"step": 1}, keep=1)
    finally:
        dist.destroy_process_group()
    assert [str(w.message) for w in seen] == []
    template = {"model": {k: torch.zeros_like(v) for k, v in engine.module.state_dict().items()}}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ckpt.load(saved, template)
    assert [str(w.message) for w in seen] == []
    assert all(torch.equal(template["model"][k], v) for k, v in engine.module.state_dict().items())
