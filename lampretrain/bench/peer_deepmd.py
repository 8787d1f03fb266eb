"""deepmd-kit's DPA4 (PyPI ``deepmd-kit`` 3.2.0, descriptor type ``dpa4``) timed on a structure file: one JSON line.

A standalone script, run by ``lampretrain bench model --model dpa4-*`` under the peer's own interpreter
(it imports ase, torch and deepmd, never lampretrain): deepmd-kit 3.2.0's wheel carries PyTorch ops
built for torch 2.11.0 and refuses other torch releases, so it lives in a virtual environment of its own:

    python3.11 -m venv ~/.cache/lampretrain/deepmd-venv
    ~/.cache/lampretrain/deepmd-venv/bin/pip install 'torch==2.11.0' 'deepmd-kit==3.2.0' mpich e3nn vesin-torch ase

(``deepmd.pt`` loads MPI through the ``mpich`` wheel's metadata and the DPA4 descriptor imports e3nn; PyPI's
torch 2.11 is the CUDA build, which runs on the CPU too). Then

    ~/.cache/lampretrain/deepmd-venv/bin/python lampretrain/bench/peer_deepmd.py --structures cu8.extxyz --mode train --threads 2

The model is ``get_model({"type": "dpa4", ...})`` with random weights; its descriptor arguments default to the
paper's Air size (C=64, L=3, M=1, 3 blocks, 4 SO(2) mixing layers, 1 focus, rank 1, 16 Bessel radial functions,
6 Å, envelopes s7/s5: 2,753,525 parameters with one element) and ``--descriptor JSON`` overrides them (the
benchmark passes the ones matching our model's config). The type map is the sorted elements of the file.

Modes, one step each:

- ``infer``: energy, forces and virial, one model call per structure (deepmd's forward builds its own
  neighbor list; that build is timed separately once and reported as ``neighbor_list_s``).
- ``train``: the same loss as ours (batch means of the squared per-atom energy, force and virial/N errors;
  absent labels count as zero) and one AdamW step, with one call and one backward pass (double backward
  through the forces) per structure: the accumulated gradient is the whole batch's, at the peak memory of
  the largest structure rather than of all of them.

Timing matches ``lampretrain bench model``: ``--warmup`` untimed steps, then ``--repeat`` timed steps, the
median reported; peak memory is this process's peak resident set (``VmHWM``, restarted before every timed
step) or, on CUDA, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

AIR = {  # deepmd-kit 3.2.0 DescrptSeZM arguments of the paper's Air size (arXiv 2606.02419, SM Matbench table)
    "type": "dpa4",
    "sel": 384,  # the paper's max neighbors; deepmd drops padding slots before message passing
    "rcut": 6.0,
    "env_exp": [7, 5],
    "channels": 64,
    "n_radial": 16,
    "lmax": 3,
    "mmax": 1,
    "n_blocks": 3,
    "mixing_layers": 4,
    "n_focus": 1,
    "focus_dim": 0,
    "radial_so2_mode": "degree_channel",
    "radial_so2_rank": 1,
    "n_atten_head": 1,
    "ffn_neurons": 0,
    "ffn_so3_grid": False,  # paper era: S² Lebedev grid in the FFN
    "lebedev_quadrature": True,
    "edge_norm": True,
    "use_env_seed": True,
    "random_gamma": True,
    "use_amp": False,
    "precision": "float32",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--structures", required=True, help="any file ase.io.read(FILE, ':') reads")
    p.add_argument("--mode", choices=("infer", "train"), default="infer")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--descriptor", default="{}", help="JSON object of DescrptSeZM arguments overriding the Air ones")
    p.add_argument("--amp", action="store_true",
                   help="deepmd's own bf16 autocast inside the blocks (training and, via DP_AMP_INFER, inference); "
                   "deepmd applies it on CUDA only")
    p.add_argument("--model", default="dpa4-air", help="the name reported in the JSON line")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def peak_rss_mb() -> float:
    """Peak resident memory of this process since start or the last :func:`reset_peak_rss` (MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise OSError("/proc/self/status has no VmHWM line")


def reset_peak_rss() -> None:
    """Restart the VmHWM count (Linux ``clear_refs`` 5) after returning freed heap to the system."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def read_structures(path: str) -> list:
    import ase.io

    frames = ase.io.read(path, ":")
    if not frames:
        raise SystemExit(f"{path}: no structures")
    for i, atoms in enumerate(frames):
        if any(atoms.pbc) and not all(atoms.pbc):
            raise SystemExit(f"{path}: structure {i}: pbc {atoms.pbc.tolist()}: deepmd takes fully periodic or none")
    return frames


def labels(atoms) -> tuple[float, np.ndarray, np.ndarray]:
    """(energy, forces (N, 3), virial (9,)) of ``atoms``; an absent label is zero (it only shapes the loss)."""
    calc = atoms.calc
    results = calc.results if calc is not None else {}
    energy = float(results.get("energy", 0.0))
    forces = np.asarray(results.get("forces", np.zeros((len(atoms), 3))), dtype=float)
    virial = np.zeros(9)
    if "stress" in results and all(atoms.pbc):
        from ase.stress import voigt_6_to_full_3x3_stress

        virial = (-voigt_6_to_full_3x3_stress(results["stress"]) * atoms.get_volume()).reshape(9)
    return energy, forces, virial


def build_model(type_map: list[str], descriptor: dict, amp: bool, device: str):
    from deepmd.pt.model.model import get_model

    config = {**AIR, **descriptor, "use_amp": amp}
    model = get_model({"type": "dpa4", "type_map": type_map, "descriptor": config, "fitting_net": {}})
    randomize_zero_weights(model)
    return model.to(torch.device(device)), config


@torch.no_grad()
def randomize_zero_weights(model: torch.nn.Module) -> None:
    """Fill the zero-initialised weight matrices (the residual branches' last layers, the env-seed projection) with
    N(0, 1/fan_in) entries.

    At deepmd's initialisation these make the energy independent of the positions: forces are exactly zero and
    the force loss has no gradient, which is not a training step of a trained model.
    """
    for param in model.parameters():
        if param.ndim >= 2 and not param.any():
            param.normal_(0.0, param.shape[-2] ** -0.5)  # weights are stored (…, in, out)


def frame_tensors(frames: list, type_map: list[str], device: str) -> list[dict]:
    """Per structure: coord (1, N, 3), atype (1, N), box (1, 9) or None and the labels, in deepmd's dtypes."""
    from deepmd.pt.utils import env

    dtype = env.GLOBAL_PT_FLOAT_PRECISION
    index = {symbol: i for i, symbol in enumerate(type_map)}
    out = []
    for atoms in frames:
        energy, forces, virial = labels(atoms)
        as_t = lambda a: torch.as_tensor(np.asarray(a), dtype=dtype, device=device)  # noqa: E731
        out.append({
            "coord": as_t(atoms.positions)[None],
            "atype": torch.as_tensor([index[s] for s in atoms.get_chemical_symbols()], device=device)[None],
            "box": as_t(atoms.cell.array.reshape(9))[None] if all(atoms.pbc) else None,
            "energy": as_t([energy]), "force": as_t(forces)[None], "virial": as_t(virial)[None],
        })
    return out


def count_edges(model, tensors: list[dict], sel: int, path: str) -> tuple[int, float]:
    """(directed edges within the cutoff, seconds of one neighbor-list build of all structures, part of every step).

    Fails when an atom has more neighbors than ``sel``: deepmd would silently drop the farthest ones.
    """
    edges, seconds = 0, 0.0
    for i, t in enumerate(tensors):
        start = time.perf_counter()
        schema = model.build_neighbor_list(t["coord"], t["atype"], t["box"])
        seconds += time.perf_counter() - start
        mask = schema.edge_mask.bool()
        most = max((int(row[mask].bincount().max()) for row in schema.edge_index), default=0) if mask.any() else 0
        if most >= sel:  # deepmd caps every atom's neighbors at sel
            raise SystemExit(f"{path}: structure {i}: an atom has {most} neighbors within the cutoff, sel={sel}: raise sel")
        edges += int(mask.sum())
    return edges, seconds


def make_step(model, tensors: list[dict], mode: str) -> Callable[[], float]:
    if mode == "infer":
        model.eval()

        def infer():
            total = 0.0
            for t in tensors:  # one call per structure
                total += model(t["coord"], t["atype"], box=t["box"])["energy"].sum().item()  # F, W computed inside
            return total

        return infer
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    n_frames, n_atoms = len(tensors), sum(t["atype"].shape[1] for t in tensors)

    def train():
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for t in tensors:  # one call and one backward per structure: the gradients add up to the whole batch's
            out = model(t["coord"], t["atype"], box=t["box"])
            n = t["atype"].shape[1]
            loss = (
                (((out["energy"].reshape(-1) - t["energy"]) / n) ** 2).sum() / n_frames
                + ((out["force"] - t["force"]) ** 2).sum() / (3 * n_atoms)
                + (((out["virial"] - t["virial"]) / n) ** 2).sum() / (9 * n_frames)
            )  # this structure's share of the batch means of ours
            loss.backward()
            total += loss.item()
        optimizer.step()
        return total

    return train


def time_step(step: Callable[[], float], repeat: int, warmup: int, device: str) -> dict:
    """Median seconds per step and peak memory (MiB) over the timed steps."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    times, peak = [], 0.0
    for _ in range(repeat):
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
        peak = max(peak, torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb())
    return {"median_s_per_step": statistics.median(times), "peak_mb": peak}


def run(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.amp:
        import os

        os.environ["DP_AMP_INFER"] = "1"  # read when the descriptor is built
    import deepmd
    import deepmd.pt.model.model  # noqa: F401  its import applies DP_INTRA_OP_PARALLELISM_THREADS: set ours after it

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    frames = read_structures(args.structures)
    type_map = sorted({s for atoms in frames for s in atoms.get_chemical_symbols()})
    model, config = build_model(type_map, json.loads(args.descriptor), args.amp, args.device)
    tensors = frame_tensors(frames, type_map, args.device)
    edges, nlist_s = count_edges(model, tensors, int(config["sel"]), args.structures)
    model.eval()
    first = tensors[0]
    max_force = model(first["coord"], first["atype"], box=first["box"])["force"].abs().max().item()
    measured = time_step(make_step(model, tensors, args.mode), args.repeat, args.warmup, args.device)
    atoms = sum(len(a) for a in frames)
    result = {
        "bench": "model", "impl": "deepmd-kit", "model": args.model, "n_structures": len(frames), "atoms": atoms,
        "edges": edges, "angles": 0, "mode": args.mode, "device": args.device,
        "dtype": "bfloat16" if args.amp and args.device == "cuda" else "float32", "compile": False,
        "threads": torch.get_num_threads(), "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "median_s_per_step": measured["median_s_per_step"], "atoms_per_s": atoms / measured["median_s_per_step"],
        "peak_rss_mb": measured["peak_mb"], "neighbor_list_s": nlist_s, "max_abs_force_first": max_force,
        "versions": {"deepmd-kit": deepmd.__version__, "torch": torch.__version__},
        "descriptor": config, "type_map": type_map,
    }
    if args.device == "cuda":
        result["peak_cuda_mb"] = measured["peak_mb"]
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    run(sys.argv[1:])
