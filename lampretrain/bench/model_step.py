"""Time one model step (inference E, F, σ or a training step) on all structures of a file as one batch
(``--per-structure``: one call per structure).

    python benchmarks/model_step.py --model matris-10m --structures cu20.extxyz --mode infer --threads 2

Prints one JSON line: bench, impl, model, params, n_structures, atoms, edges, angles, mode, device,
median_s_per_step, atoms_per_s, peak_rss_mb (CUDA: peak allocated memory). ``--flops`` adds the
matmul FLOPs of one step (counted by torch's FlopCounterMode), the measured dense matmul rate of the
device and the fraction of it the step reaches.

``--dtype bfloat16`` runs the float32 model under autocast (matmuls in bfloat16); ``--set KEY=VALUE``
overrides a model option (e.g. ``--set checkpoint_angles=0``).

Works for any registered backbone (``lampretrain.models.backbone.Backbone``): ``build(name)`` gives it its
default heads, and the graph cutoffs are the backbone's (``three_body_cutoff`` 0: no angles).

Peers run side by side in the same process on the same frames (``--peers auto``, the default),
timed in alternation with ours so that a load change on a shared machine hits both: the official
MatRIS code for ``matris-*`` (``impl: matris-official``, with ``ratio`` = our atoms/s over its;
reported as skipped when a structure is not periodic, which its graph converter cannot take),
deepmd-kit's DPA4 for ``dpa4-*`` (``impl: deepmd-kit``). deepmd-kit 3.2.0 needs torch 2.11.0, so it
runs ``bench/peer_deepmd.py`` under its own interpreter (``--peer-python``, ``$LAMPRETRAIN_DEEPMD_PYTHON``
or the venv that ``bench/peers.py`` documents) in a subprocess, before ours is timed, on the same file,
mode, threads, repeat and warm-up, with descriptor arguments matching our config; its peak memory is
its own process's. Without an interpreter it is reported as skipped with the command that builds one.

GPU path (``--device cuda``): timing is synchronised around every step after ``--warmup`` steps
(which also absorb ``--compile``'s compilation), memory is ``torch.cuda.max_memory_allocated``
over the timed steps (``peak_cuda_mb``). ``--max-fit`` then searches the largest supercell of the
first structure whose step still fits in device memory (binary search over the repeat sequence
1×1×1, 2×1×1, 2×2×1, 2×2×2, 3×2×2, ...; an out-of-memory step is caught and the cache emptied)
and emits a ``model_max_fit`` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import time
from typing import Callable

import numpy as np
import torch

from lampretrain import malloc
from lampretrain.bench import peers
from lampretrain.bench.common import emit, peak_rss_mb, reset_peak_rss, skipped
from lampretrain.frames import Frame
from lampretrain.graph.batch import GraphBatch, collate
from lampretrain.io import read_frames
from lampretrain.models import build, graph_cutoffs

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
    p.add_argument("--per-structure", action="store_true",
                   help="one model call (and, training, one backward) per structure, one optimizer step, as the "
                   "deepmd-kit peer runs; default: all structures as one batch")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="model option override (YAML value), repeatable"
    )
    p.add_argument("--flops", action="store_true", help="also count matmul FLOPs per step and measure the matmul rate")
    p.add_argument("--peers", choices=("auto", "none"), default="auto",
                   help="run the peer implementation side by side when installed (default: %(default)s)")
    p.add_argument("--peer-python", default=None, metavar="PATH",
                   help="interpreter with deepmd-kit 3.2.0 for the dpa4-* peer (default: $LAMPRETRAIN_DEEPMD_PYTHON, "
                   "then the venv of bench/peers.py)")
    p.add_argument("--max-fit", action="store_true",
                   help="CUDA: also find the largest supercell of the first structure whose step fits in memory")
    p.add_argument("--max-repeat", type=int, default=40, help="--max-fit searches repeats up to N×N×N")
    p.add_argument("--malloc-mmap-threshold", default=None, type=mmap_threshold, metavar="MB|auto|none",
                   help="glibc mmap threshold for this process, as the trainer's train.malloc_mmap_threshold_mb "
                   "(lampretrain/malloc.py; default: glibc's dynamic threshold)")
    p.add_argument("--json-out", default=None, help="also write the JSON line to this file")
    return p.parse_args(argv)


def mmap_threshold(value: str) -> float | str | None:
    if value in ("auto", "none"):
        return None if value == "none" else value
    return float(value)


def overrides(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got '{pair}'")
        out[key] = yaml.safe_load(value)
    return out


def under_autocast(step: Callable, device: str, autocast: torch.dtype | None) -> Callable:
    """``step`` run under ``torch.autocast`` (None: unchanged)."""
    if autocast is None:
        return step

    def mixed():
        with torch.autocast(device_type=device, dtype=autocast):
            return step()

    return mixed


def make_step(model: torch.nn.Module, batches: list[GraphBatch], mode: str, device: str, autocast: torch.dtype | None):
    """A closure running one step over ``batches`` (one model call each); training uses an energy + force +
    stress MSE per batch, one backward per batch (the gradients add up) and one AdamW step."""
    if autocast is not None:
        return under_autocast(make_step(model, batches, mode, device, None), device, autocast)
    if mode == "infer":
        model.eval()

        def infer():
            return sum(model(b, compute_forces=True, compute_stress=True)["energy"].sum().item() for b in batches)

        return infer
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def loss_of(batch: GraphBatch) -> torch.Tensor:
        out = model(batch, compute_forces=True, compute_stress=True)
        n = batch.n_atoms.to(batch.energy.dtype)
        return (
            (((out["energy"] - batch.energy) / n) ** 2).mean()
            + ((out["forces"] - batch.forces) ** 2).mean()
            + ((out["stress"] - batch.stress) ** 2).mean()
        )

    def train():
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for batch in batches:
            loss = loss_of(batch)
            loss.backward()
            total += loss.item()
        optimizer.step()
        return total

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


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()


def peak_memory_mb(device: str) -> float:
    """CUDA: peak allocated tensor memory; CPU: peak resident memory of the process (since the last reset)."""
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb()


def time_alternating(steps: dict[str, Callable], repeat: int, warmup: int, device: str) -> dict[str, dict]:
    """Median seconds and peak memory of each step; the implementations take turns within every repetition."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    peaks = dict.fromkeys(steps, 0.0)
    for _ in range(repeat):
        for name, step in steps.items():
            synchronize(device)
            reset_peak_memory(device)
            t = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - t)
            peaks[name] = max(peaks[name], peak_memory_mb(device))
    return {name: {"median_s_per_step": statistics.median(times[name]), "peak_mb": peaks[name]} for name in steps}


def supercell(frame: Frame, repeat: tuple[int, int, int]) -> Frame:
    """``frame`` repeated along its cell vectors, labels tiled (energy extensive, stress intensive)."""
    if frame.cell is None:
        raise ValueError(f"{frame.source}: a supercell needs a periodic cell")
    m = int(np.prod(repeat))
    shifts = np.array([(i, j, k) for i in range(repeat[0]) for j in range(repeat[1]) for k in range(repeat[2])])
    positions = (frame.positions[None, :, :] + (shifts @ frame.cell)[:, None, :]).reshape(-1, 3)  # image-major

    def tile(a):
        return None if a is None else np.tile(a, (m, 1)) if a.ndim == 2 else np.tile(a, m)

    return dataclasses.replace(
        frame, positions=positions, numbers=np.tile(frame.numbers, m), cell=frame.cell * np.array(repeat)[:, None],
        energy=None if frame.energy is None else frame.energy * m, forces=tile(frame.forces),
        magmoms=tile(frame.magmoms), source=f"{frame.source} x{repeat[0]}x{repeat[1]}x{repeat[2]}",
    )


def repeat_sequence(n: int) -> list[tuple[int, int, int]]:
    """1×1×1, 2×1×1, 2×2×1, 2×2×2, 3×2×2, ... up to n×n×n: each grows one axis by one, so atoms increase monotonically."""
    seq, rep = [(1, 1, 1)], [1, 1, 1]
    while rep != [n, n, n]:
        rep[rep.index(min(rep))] += 1
        seq.append(tuple(sorted(rep, reverse=True)))
    return seq


def fits(model, frame: Frame, mode: str, device: str, autocast, cutoffs, dtype) -> dict | None:
    """Memory and time of one step on ``frame`` after a warm-up step, or None when it runs out of device memory."""
    try:
        batch = collate([frame], cutoff=cutoffs[0], three_body_cutoff=cutoffs[1], dtype=dtype).to(device)
        step = make_step(model, [batch], mode, device, autocast)
        step()
        timed = time_alternating({"step": step}, repeat=1, warmup=0, device=device)["step"]
        return {"atoms": frame.natoms, "edges": batch.num_edges, "angles": batch.num_angles, **timed}
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:  # compiled code may re-raise it as a RuntimeError
        if "out of memory" not in str(err).lower():
            raise
        return None
    finally:
        model.zero_grad(set_to_none=True)


def max_fit(args, model, frame: Frame, autocast, dtype) -> dict:
    """Binary search over :func:`repeat_sequence` for the largest supercell of ``frame`` whose step fits."""
    seq = repeat_sequence(args.max_repeat)
    cutoffs = graph_cutoffs(model)
    lo, hi, best = 0, len(seq) - 1, None  # invariant: seq[lo - 1] fitted (or lo == 0), seq[hi + 1] did not
    while lo <= hi:
        mid = (lo + hi) // 2
        measured = fits(model, supercell(frame, seq[mid]), args.mode, args.device, autocast, cutoffs, dtype)
        gc.collect()  # the out-of-memory traceback held the failed step's tensors
        torch.cuda.empty_cache()
        if measured is None:
            hi = mid - 1
        else:
            best, lo = (seq[mid], measured), mid + 1
    result = {"bench": "model_max_fit", "impl": "lampretrain", "model": args.model, "mode": args.mode,
              "device": args.device, "dtype": args.dtype, "compile": args.compile, "structure": frame.source,
              "device_memory_mb": torch.cuda.get_device_properties(0).total_memory / 2**20,
              "searched_up_to": list(seq[-1])}
    if best is None:
        return {**result, "repeat": None, "atoms": 0}
    (repeat, m) = best
    return {**result, "repeat": list(repeat), "atoms": m["atoms"], "edges": m["edges"], "angles": m["angles"],
            "peak_cuda_mb": m["peak_mb"], "median_s_per_step": m["median_s_per_step"],
            "atoms_per_s": m["atoms"] / m["median_s_per_step"]}


def peer_steps(args, model, frames: list[Frame], dtype) -> tuple[dict, dict | None]:
    """({impl: step} of the installed peer of ``args.model``, or the skipped line)."""
    if args.peers == "none":
        return {}, None
    if args.model.startswith("matris"):
        from lampretrain.bench.peer_matris import (
            build_official,
            differs,
            make_official_step,
            unsupported,
        )

        _, reason = peers.load("matris")
        reason = reason or unsupported(frames)
        if reason is None and args.per_structure:
            reason = "--per-structure: the official MatRIS step here takes all structures as one batch"
        if reason is not None:
            return {}, skipped("model", peers.PEERS["matris"].name, reason, model=args.model, mode=args.mode)
        official = build_official(model, args.device, dtype)
        reason = differs(model, official, frames, args.device, dtype)
        if reason is not None:
            return {}, skipped("model", peers.PEERS["matris"].name, reason, model=args.model, mode=args.mode)
        return {peers.PEERS["matris"].name: (official, make_official_step(official, frames, args.mode, args.device))}, None
    return {}, None


def deepmd_line(args, model: torch.nn.Module) -> dict:
    """deepmd-kit's DPA4 JSON line on the same structures, run in its own interpreter, or the skipped line.

    Run before our model meets the batch, so that the two processes never hold their peak memory at once.
    """
    python, reason = peers.deepmd_python(args.peer_python)
    if python is not None:
        line, reason = peers.run_deepmd(
            python, args.structures, model.backbone.config, model=args.model, mode=args.mode, device=args.device,
            threads=torch.get_num_threads(), repeat=args.repeat, warmup=args.warmup, amp=args.dtype == "bfloat16",
        )
        if line is not None:
            # the case keys are ours (as for in-process peers); what the peer really ran in is kept apart
            return {**line, "dtype": args.dtype, "compile": args.compile, "peer_dtype": line["dtype"],
                    "peer_compile": line["compile"], "peer_python": python}
    return skipped("model", peers.PEERS["deepmd-kit"].name, reason, model=args.model, mode=args.mode)


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, time the step (and the peer's), print and return our JSON result."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_fit and args.device != "cuda":
        raise SystemExit("--max-fit needs --device cuda (a CPU out-of-memory kills the process instead of raising)")
    autocast = torch.bfloat16 if args.dtype == "bfloat16" else None
    dtype = torch.float32 if autocast else DTYPES[args.dtype]
    options = overrides(args.set)
    if args.model.startswith("matris") and args.peers != "none":
        # the official code computes the published function; the smooth one costs the same (one product per edge)
        options.setdefault("smooth", False)
    model = build(args.model, **options).to(device=args.device, dtype=dtype)
    cutoff, three_body_cutoff = graph_cutoffs(model)
    threshold = malloc.resolve(args.malloc_mmap_threshold, three_body_cutoff)
    threshold = threshold if malloc.set_mmap_threshold(threshold) else None
    frames = [f.validate() for f in read_frames(args.structures)]
    deepmd = deepmd_line(args, model) if args.peers == "auto" and args.model.startswith("dpa4") else None
    batch = collate(frames, cutoff=cutoff, three_body_cutoff=three_body_cutoff, dtype=dtype).to(args.device)
    batches = (
        [collate([f], cutoff=cutoff, three_body_cutoff=three_body_cutoff, dtype=dtype).to(args.device) for f in frames]
        if args.per_structure else [batch]
    )
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plain_model = model
    if args.compile:
        model = torch.compile(model)
    steps = {"lampretrain": make_step(model, batches, args.mode, args.device, autocast)}
    peer_models, skip = peer_steps(args, plain_model, frames, dtype)
    for name, (peer_model, peer_step) in peer_models.items():
        steps[name] = under_autocast(peer_step, args.device, autocast)
    measured = time_alternating(steps, args.repeat, args.warmup, args.device)
    atoms = int(batch.n_atoms.sum())
    case = {"model": args.model, "n_structures": len(frames), "atoms": atoms, "edges": batch.num_edges,
            "angles": batch.num_angles, "mode": args.mode, "device": args.device, "dtype": args.dtype,
            "compile": args.compile, "per_structure": args.per_structure, "options": options, "threads": torch.get_num_threads(), "malloc_mmap_threshold_mb": threshold}
    results = []
    for name, m in measured.items():
        impl_params = params if name == "lampretrain" else sum(p.numel() for p in peer_models[name][0].parameters())
        result = {"bench": "model", "impl": name, **case, "params": impl_params,
                  "median_s_per_step": m["median_s_per_step"], "atoms_per_s": atoms / m["median_s_per_step"],
                  "peak_rss_mb": m["peak_mb"]}
        if args.device == "cuda":
            result["peak_cuda_mb"] = m["peak_mb"]
        results.append(result)
    ours = results[0]
    if deepmd is not None and "skipped" in deepmd:
        skip = deepmd
    elif deepmd is not None:
        results.append(deepmd)
    for peer in results[1:]:
        peer["ratio"] = ours["atoms_per_s"] / peer["atoms_per_s"]  # > 1: lampretrain is faster
        peer["memory_ratio"] = ours["peak_rss_mb"] / peer["peak_rss_mb"]
    if args.flops:
        flops = count_flops(steps["lampretrain"])
        rate = matmul_rate(args.device, autocast or dtype)
        ours.update(
            matmul_flops_per_step=flops,
            matmul_gflops_measured=rate / 1e9,
            matmul_utilization=flops / ours["median_s_per_step"] / rate,
        )
    for result in results:
        emit(result, args.json_out)
    if skip is not None:
        emit(skip, args.json_out)
    if args.max_fit:
        emit(max_fit(args, model, frames[0], autocast, dtype), args.json_out)
    return ours


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0
