"""Trainer scaling: step time and atoms/s at 1..R ranks, parallel efficiency, and the trainer's overhead.

    python benchmarks/scaling.py   (or: lampretrain bench scaling) --store outputs/demo/store --ranks 1 2
    lampretrain bench scaling --store STORE --model dpa4-neo --device cuda --ranks 1 --json-out benchmarks/results/scaling.jsonl

For each rank count the real ``lampretrain pretrain`` loop runs under
torchrun (gloo on CPU, nccl on GPU) for ``--warmup`` steps and then
``--steps`` measured steps (metric windows of gcd(warmup, steps) steps, as
the trainer logs them; no MLflow, no checkpoint inside). Prints one JSON line per rank count::

    bench, ranks, device, model, step_time_s, atoms_per_s, atoms_per_s_per_rank, efficiency, imbalance_atoms

``efficiency`` is (atoms/s per rank at R) / (atoms/s at 1 rank), a weak-scaling
measure: the per-rank budget is fixed, so R ranks process R times the atoms.
A last line (``bench: trainer_overhead``) compares the 1-rank trainer step
with a bare loop over the same pre-collated batches (forward with forces,
loss, backward, AdamW step; no engine, sampler, loader, EMA or metrics):
``overhead = trainer / bare − 1``, target < 5 %. Loading runs in
``--workers`` loader processes, as in training. Both run in this process,
alternating ``--overhead-repeats`` times, and the median of the pairwise
ratios is reported: on a shared machine the load drifts between runs, and a
pair measured back to back sees nearly the same load. ``cpu_overhead`` is the
same ratio of the training process's own CPU time per step (all its threads,
not the loader processes): what the trainer costs where loaders have cores of
their own, as on a GPU node; on a machine with fewer cores than compute threads
plus loaders, the wall-clock ``overhead`` also counts the loaders' contention.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from .. import resources
from .common import emit, peak_rss_mb

REPO = resources.PACKAGE.parent  # what holds the lampretrain package, checkout or site-packages
TINY = {
    "dpa4-neo": {"channels": 16, "lmax": 2, "n_blocks": 1, "so2_layers": 2, "n_radial": 8},
    "matris-4m": {"num_layers": 2, "atom_dim": 32, "bond_dim": 32, "angle_dim": 32, "readout_hidden": [32],
                  "magmom_hidden": 32},
}


def bench_recipe(args: argparse.Namespace, out_dir: Path) -> dict:
    return {
        "name": "bench-scaling",
        "output": str(out_dir),
        "data": {"store": args.store, "budget": args.budget, "max_natoms": args.max_natoms, "workers": args.workers},
        "model": {"name": args.model, "options": TINY.get(args.model, {}) if args.tiny else {}, "heads": {"hidden": [32]}},
        "objective": {"energy": 1.0, "forces": 1.0, "stress": 0.1},
        "optim": {"lr": 1e-3},
        "schedule": {"kind": "constant"},
        "train": {"steps": args.warmup + args.steps, "log_every": math.gcd(args.warmup, args.steps),
                  "progress": False, "device": args.device, "seed": 0},
        "engine": {"name": "ddp", "find_unused_parameters": args.model.startswith("matris")},
        "checkpoint": {"every": 10**9, "keep": 1},
        "tracking": {"enabled": False},
    }


def measured(windows: list[tuple[int, dict[str, float]]], warmup: int) -> dict[str, float]:
    """The metric windows after ``warmup`` steps (all of equal length) combined: mean step time, atoms/s over
    their total time, mean rank imbalance."""
    after = [m for step, m in windows if step > warmup]
    seconds = sum(m["step_time_s"] for m in after)
    atoms = sum(m["atoms_per_s"] * m["step_time_s"] for m in after)
    return {
        "step_time_s": seconds / len(after), "atoms_per_s": atoms / seconds,
        "imbalance_atoms": sum(m["imbalance_atoms"] for m in after) / len(after),
    }


def trainer_step(recipe, warmup: int) -> dict[str, float] | None:
    """Run ``pretrain`` on ``recipe`` and combine its metric windows after ``warmup`` steps (:func:`measured`),
    plus ``cpu_s_per_step``, this process's CPU time per step over the same steps; None on ranks other than 0,
    which log no windows."""
    from lampretrain.train import pretrain
    from lampretrain.train.trainer import TrainHooks

    class Windows(TrainHooks):
        def __init__(self):
            self.seen: list[tuple[int, dict[str, float]]] = []
            self.cpu: dict[int, float] = {}

        def on_log(self, step: int, metrics: dict[str, float]) -> None:
            self.cpu[step] = time.process_time()
            self.seen.append((step, metrics))

    hooks = Windows()
    pretrain(recipe, hooks=hooks)
    if not hooks.seen:
        return None
    last = hooks.seen[-1][0]
    return measured(hooks.seen, warmup) | {"cpu_s_per_step": (hooks.cpu[last] - hooks.cpu[warmup]) / (last - warmup)}


def worker(recipe_path: str, result_path: str, warmup: int) -> None:
    """One rank of the measured run (under torchrun); rank 0 writes the windows after the warmup combined."""
    from lampretrain.recipe import load_recipe

    result = trainer_step(load_recipe(recipe_path), warmup)
    if int(os.environ.get("RANK", 0)) == 0:
        Path(result_path).write_text(json.dumps(result))


def run_ranks(args: argparse.Namespace, ranks: int, tmp: Path) -> dict:
    recipe = tmp / f"recipe-{ranks}.yaml"
    recipe.write_text(yaml.safe_dump(bench_recipe(args, tmp / f"run-{ranks}")))
    result = tmp / f"result-{ranks}.json"
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "lampretrain.bench.scaling", "--worker", str(recipe), str(result), str(args.warmup)]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{ranks}-rank run failed:\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def bare_step_time(args: argparse.Namespace, tmp: Path) -> tuple[float, float]:
    """Mean wall-clock and CPU seconds per step of the bare loop over the same first batches (1 process)."""
    import torch

    from lampretrain.models import graph_cutoffs
    from lampretrain.objectives import MultiTaskObjective
    from lampretrain.recipe import parse_recipe
    from lampretrain.train.data import build_train_data
    from lampretrain.train.trainer import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = parse_recipe(bench_recipe(args, tmp / "bare"))
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    torch.manual_seed(0)
    data = build_train_data(recipe.data, 0, 1, 0)
    model = build_model(recipe, data.datasets, data.index.stats()).to(device).train()
    data.use_cutoffs(*graph_cutoffs(model))  # as the trainer does
    stream = data.stream(0, 0)
    batches = [next(stream)[2].to(device) for _ in range(args.warmup + args.steps)]
    objective = MultiTaskObjective(recipe.objective.config(), model.config.datasets).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(batch):
        loss, _ = objective(model(batch), batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for batch in batches[: args.warmup]:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for batch in batches[args.warmup :]:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / args.steps, (time.process_time() - c0) / args.steps


def trainer_overhead(args: argparse.Namespace, tmp: Path) -> dict:
    """1-rank trainer step vs the bare loop, both in this process, alternating; median of the pairwise ratios."""
    import statistics

    from lampretrain.recipe import parse_recipe

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    wall, cpu = [], []
    for k in range(args.overhead_repeats):
        bare_wall, bare_cpu = bare_step_time(args, tmp)
        recipe = parse_recipe(bench_recipe(args, tmp / f"overhead-{k}"))
        with contextlib.redirect_stdout(sys.stderr):  # the trainer's log lines; stdout carries JSON
            trainer = trainer_step(recipe, args.warmup)
        wall.append((trainer["step_time_s"], bare_wall))
        cpu.append((trainer["cpu_s_per_step"], bare_cpu))
    ratios = [t / b - 1.0 for t, b in wall]
    cpu_ratios = [t / b - 1.0 for t, b in cpu]
    return {
        "bench": "trainer_overhead", "impl": "lampretrain", "device": args.device, "model": args.model,
        "trainer_step_s": statistics.median(t for t, _ in wall), "bare_step_s": statistics.median(b for _, b in wall),
        "overhead": statistics.median(ratios), "overhead_pairs": ratios,
        "trainer_cpu_s": statistics.median(t for t, _ in cpu), "bare_cpu_s": statistics.median(b for _, b in cpu),
        "cpu_overhead": statistics.median(cpu_ratios), "cpu_overhead_pairs": cpu_ratios,
        "workers": args.workers, "threads": args.threads, "peak_rss_mb": peak_rss_mb(),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1], argv[2], int(argv[3]))
        return 0
    p = argparse.ArgumentParser(prog="lampretrain bench scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default="outputs/demo/store", help="prepared store (default: %(default)s)")
    p.add_argument("--model", default="dpa4-neo")
    p.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=True, help="the demo-sized model (default)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--budget", type=float, default=96.0, help="atoms per rank and step")
    p.add_argument("--max-natoms", type=int, default=48)
    p.add_argument("--workers", type=int, default=1, help="loader processes per rank")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (OMP_NUM_THREADS)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--overhead-repeats", type=int, default=3,
                   help="trainer/bare pairs for the overhead line; 0 skips it (default: %(default)s)")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lampretrain-scaling-") as tmp:
        tmp = Path(tmp)
        base = None
        for ranks in args.ranks:
            m = run_ranks(args, ranks, tmp)
            per_rank = m["atoms_per_s"] / ranks
            base = per_rank if base is None and ranks == min(args.ranks) else base
            emit({
                "bench": "scaling", "impl": "lampretrain", "ranks": ranks, "device": args.device, "model": args.model,
                "engine": "ddp", "step_time_s": m["step_time_s"], "atoms_per_s": m["atoms_per_s"],
                "atoms_per_s_per_rank": per_rank, "efficiency": per_rank / base,
                "imbalance_atoms": m["imbalance_atoms"], "steps": args.steps,
            }, args.json_out)
        if args.overhead_repeats > 0:
            emit(trainer_overhead(args, tmp), args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
