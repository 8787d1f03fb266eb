"""Process-group setup for torchrun, the deepspeed launcher and plain single-process runs."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control: dist.ProcessGroup  # gloo group for host-side flags (preemption), never touches the GPU stream
    owns_group: bool = True  # setup() created the process group, so teardown() destroys it
    solo_env: bool = False  # setup() set RANK, WORLD_SIZE, ... itself (a world of one): teardown() removes them

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SOLO_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(device: str = "auto", backend: str = "auto") -> Context:
    """Join the job's process group (env:// from torchrun/deepspeed) or make a group of one.

    A process group the caller initialized already is used as it is and outlives the run: a process
    that runs several trainings (tests, notebooks) keeps one group, because re-initializing one on the
    same rendezvous store is not reliable (stale keys, libraries' cached sub-groups).
    """
    solo = "RANK" not in os.environ
    if solo:  # a plain `lampretrain pretrain`: a world of one, same code path
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=backend, device_id=dev if use_cuda else None)
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, dev, control, owns, solo)


def teardown(ctx: Context) -> None:
    if dist.is_initialized():
        dist.barrier()
        if ctx.owns_group:
            dist.destroy_process_group()
    if ctx.solo_env:  # a later run in this process, or a child it starts, must not take them for a launcher's
        for key in SOLO_ENV:
            os.environ.pop(key, None)
