"""Time one model step (inference E, F, σ or a training step) on all structures of a file as one batch.

    python benchmarks/model_step.py --model matris-10m --structures cu20.extxyz --mode infer --threads 2

Prints one JSON line: bench, impl, model, params, n_structures, atoms, edges, angles, mode, device,
median_s_per_step, atoms_per_s, peak_rss_mb (CUDA: peak allocated memory). ``--flops`` adds the
matmul FLOPs of one step (counted by torch's FlopCounterMode), the measured dense matmul rate of the
device and the fraction of it the step reaches.

``--dtype bfloat16`` runs the float32 model under autocast (matmuls in bfloat16); ``--set KEY=VALUE``
overrides a model option (e.g. ``--set checkpoint_angles=0``).

Works for any registered model that follows the backbone contract
(``model(batch, compute_forces, compute_stress)``); the graph cutoffs come from ``model.config``
(``cutoff`` and, for models with a line graph, ``three_body_cutoff``; 0 means no angles).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lampretrain.bench.common import emit, peak_rss_mb
from lampretrain.graph.batch import GraphBatch, collate
from lampretrain.io import read_frames
from lampretrain.models import build

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
# bfloat16 runs as autocast over a float32 model: positions and cells in bfloat16 would lose ~0.05 Å


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lampretrain bench model", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="registered model name, e.g. matris-10m")
    p.add_argument("--structures", required=True, help="any file ase.io.read(FILE, ':') reads; all structures form one batch")
    p.add_argument("--mode", choices=("infer", "train"), default="infer")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="model option override (YAML value), repeatable"
    )
    p.add_argument("--flops", action="store_true", help="also count matmul FLOPs per step and measure the matmul rate")
    p.add_argument("--json-out", default=None, help="also write the JSON line to this file")
    return p.parse_args(argv)


def overrides(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got '{pair}'")
        out[key] = yaml.safe_load(value)
    return out


def graph_cutoffs(model: torch.nn.Module) -> tuple[float, float]:
    config = getattr(model, "config", None)
    return float(getattr(config, "cutoff", 6.0)), float(getattr(config, "three_body_cutoff", 0.0))


def make_step(model: torch.nn.Module, batch: GraphBatch, mode: str, device: str, autocast: torch.dtype | None):
    """A closure running one step; training uses an energy + force + stress MSE and AdamW."""
    if autocast is not None:
        plain = make_step(model, batch, mode, device, None)

        def mixed():
            with torch.autocast(device_type=device, dtype=autocast):
                return plain()

        return mixed
    if mode == "infer":
        model.eval()

        def infer():
            out = model(batch, compute_forces=True, compute_stress=True)
            return out["energy"].sum().item()

        return infer
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    n = batch.n_atoms.to(batch.energy.dtype)

    def train():
        optimizer.zero_grad(set_to_none=True)
        out = model(batch, compute_forces=True, compute_stress=True)
        loss = (
            (((out["energy"] - batch.energy) / n) ** 2).mean()
            + ((out["forces"] - batch.forces) ** 2).mean()
            + ((out["stress"] - batch.stress) ** 2).mean()
        )
        loss.backward()
        optimizer.step()
        return loss.item()

    return train


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: str, dtype: torch.dtype, n: int = 2048, repeat: int = 3) -> float:
    """Measured dense (n×n)·(n×n) FLOP/s of this device and dtype (best of ``repeat``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        synchronize(device)
        t = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def count_flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, time the step, print and return the JSON result."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    autocast = torch.bfloat16 if args.dtype == "bfloat16" else None
    dtype = torch.float32 if autocast else DTYPES[args.dtype]
    model = build(args.model, **overrides(args.set)).to(device=args.device, dtype=dtype)
    cutoff, three_body_cutoff = graph_cutoffs(model)
    frames = [f.validate() for f in read_frames(args.structures)]
    batch = collate(frames, cutoff=cutoff, three_body_cutoff=three_body_cutoff, dtype=dtype).to(args.device)
    if args.compile:
        model = torch.compile(model)
    step = make_step(model, batch, args.mode, args.device, autocast)
    for _ in range(args.warmup):
        step()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeat):
        synchronize(args.device)
        t = time.perf_counter()
        step()
        synchronize(args.device)
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    if args.device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = peak_rss_mb()
    atoms = int(batch.n_atoms.sum())
    result = {
        "bench": "model",
        "impl": "lampretrain",
        "model": args.model,
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "n_structures": len(frames),
        "atoms": atoms,
        "edges": batch.num_edges,
        "angles": batch.num_angles,
        "mode": args.mode,
        "device": args.device,
        "median_s_per_step": median,
        "atoms_per_s": atoms / median,
        "peak_rss_mb": peak_mb,
    }
    if args.flops:
        flops = count_flops(step)
        rate = matmul_rate(args.device, autocast or dtype)
        result.update(
            matmul_flops_per_step=flops,
            matmul_gflops_measured=rate / 1e9,
            matmul_utilization=flops / median / rate,
        )
    emit(result, args.json_out)
    return result


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0
