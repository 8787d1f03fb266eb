"""``--cluster local``: the multi-node shape on one machine, one torchrun per "node" on loopback.

Each node runs the same command line a Slurm node runs (``--nnodes N``, c10d rendezvous, ``--resume auto``);
only the rendezvous endpoint is 127.0.0.1 on a free port. Without GPUs the ranks are CPU processes (gloo).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from .plan import LaunchPlan
from .validate import local_gpus

STOP_GRACE_S = 60  # a failed node's peers get this long to exit after SIGTERM before SIGKILL


def node_commands(plan: LaunchPlan, port: int, rdzv_id: str) -> list[list[str]]:
    """The torchrun command line of every node, rendezvous on 127.0.0.1:``port``."""
    return [
        [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", str(plan.nodes), "--node_rank", str(k), "--nproc_per_node", str(plan.gpus_per_node),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", rdzv_id,
            "-m", "lampretrain.cli", *plan.command_args(),
        ]
        for k in range(plan.nodes)
    ]


def node_environments(plan: LaunchPlan) -> list[dict[str, str]]:
    """Per-node environments: a disjoint GPU slice each when there are GPUs, one thread per rank on CPU."""
    base = {**os.environ, **plan.profile.environment.variables}
    gpus = local_gpus()
    envs = []
    for k in range(plan.nodes):
        env = dict(base)
        if gpus >= plan.world_size:
            first = k * plan.gpus_per_node
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + g) for g in range(plan.gpus_per_node))
        else:
            env.setdefault("OMP_NUM_THREADS", "1")
        envs.append(env)
    return envs


def run_local(plan: LaunchPlan, port: int | None = None) -> int:
    """Start every node, wait; if one fails, stop the others. Returns 0 or the first failing node's code."""
    from ..train.distributed import free_port

    port = port or free_port()
    commands = node_commands(plan, port, f"lampretrain-local-{os.getpid()}")
    print(f"[lampretrain] local: {plan.nodes} node(s) x {plan.gpus_per_node} rank(s), rendezvous 127.0.0.1:{port}",
          flush=True)
    procs = [subprocess.Popen(cmd, env=env) for cmd, env in zip(commands, node_environments(plan))]
    failed = 0
    try:
        while any(p.poll() is None for p in procs):
            codes = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if codes and not failed:
                failed = codes[0]
                _stop(procs)
            time.sleep(0.2)
    except KeyboardInterrupt:
        _stop(procs)  # SIGTERM lets the trainer checkpoint first
        raise
    codes = [p.returncode for p in procs]
    for k, code in enumerate(codes):
        if code != 0:
            print(f"[lampretrain] local node {k} exited with {code}", file=sys.stderr, flush=True)
    return failed or next((c for c in codes if c != 0), 0)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
