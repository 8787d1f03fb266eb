"""Multi-task ablation at equal optimiser steps on the bundled real fixtures.

Variants (all on the same frames, seed, steps and backbone size):
``per_dataset_static`` (reference), ``single_head`` (one shared energy head, references
still per dataset), ``uncertainty`` (dynamic balancing), ``denoise_then_finetune``
(the first half of the steps with DeNS, the second half without). Prints one JSON
line per variant with per-dataset validation energy MAE (meV/atom) and force MAE
(meV/Å), plus the per-dataset mean baseline (references + mean residual, zero forces).
The validation sets are a quarter of 2-24 frames per dataset (one or two frames for
mlearn Si and Al r2SCAN): read differences of a few meV/atom there as noise. Loss weights
are ObjectiveConfig's defaults in every variant, not the demo recipes' tuned ones.
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .. import resources
from ..frames import Frame
from ..graph.batch import collate
from ..io import read_frames
from ..models.heads import DenoisingConfig
from ..models.multitask import DatasetSpec, HeadsConfig, MultiTaskConfig, MultiTaskModel
from ..objectives import MultiTaskObjective, ObjectiveConfig
from ..objectives.metrics import energy_per_atom_mae, force_norm_mae
from .common import emit, peak_rss_mb

REAL = resources.path("tests/data/real")
SOURCES = {  # dataset → (path, frames kept)
    "mp_pbeu": ("custodian_vasp_mp/FeO_PBEU_relax/vasprun.xml", 12),
    "mp_r2scan": ("custodian_vasp_mp/Al_r2SCAN_relax/vasprun.xml", 12),
    "cho_mn15": ("deepmd_nopbc_cho", 24),
    "spice": ("spice_hdf5/SPICE-1.1.4_n2.hdf5", 12),
    "mlearn_pbe": ("mlearn_pbe_elemental/Si", 6),
}
BACKBONES = {
    "matris": ("matris-4m", dict(num_layers=2, atom_dim=32, bond_dim=16, angle_dim=16, readout_hidden=(32,), magmom_hidden=16)),
    "dpa4": ("dpa4-neo", dict(channels=16, lmax=2, n_blocks=2, so2_layers=2, n_radial=8, cutoff=5.0)),
}


def load_frames(root: Path) -> dict[str, list[Frame]]:
    out = {}
    for name, (path, keep) in SOURCES.items():
        frames = [replace(f, dataset=name) for f in itertools.islice(read_frames(root / path), keep)]
        out[name] = [f for f in frames if f.energy is not None and f.forces is not None]
    return out


def fit_spec(name: str, frames: list[Frame]) -> DatasetSpec:
    """Least-squares element references (float64) and residual/force RMS from the training frames."""
    elements = sorted({int(z) for f in frames for z in f.numbers})
    counts = np.array([[np.sum(f.numbers == z) for z in elements] for f in frames], dtype=np.float64)
    energies = np.array([f.energy for f in frames], dtype=np.float64)
    refs, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    residual = (energies - counts @ refs) / counts.sum(1)
    forces = np.concatenate([f.forces.ravel() for f in frames])
    # floors: a handful of frames can fit the references exactly, and a one-atom cell has zero forces
    energy_rms = max(float(np.sqrt(np.mean(residual**2))), 0.01)
    force_rms = max(float(np.sqrt(np.mean(forces**2))), 0.1)
    return DatasetSpec(name, dict(zip(elements, refs.tolist())), energy_rms, force_rms)


def evaluate(model: MultiTaskModel, batch, names) -> dict[str, float]:
    model.eval()
    out = model(batch, compute_stress=False)
    out = {k: v.detach() for k, v in out.items()}
    result = {}
    for k, name in enumerate(names):
        g = batch.dataset == k
        a = batch.dataset[batch.batch] == k
        energy = energy_per_atom_mae(out["energy"], batch.energy, g, batch.n_atoms)
        result[f"{name}/energy_per_atom_mae_meV_atom"] = float(energy) * 1e3
        result[f"{name}/force_norm_mae_meV_A"] = float(force_norm_mae(out["forces"], batch.forces, a)) * 1e3
    return result


def baseline(batch, specs, mean_residual: dict[str, float]) -> dict[str, float]:
    """Per-dataset mean predictor: references + the training mean residual per atom, zero forces."""
    result = {}
    for k, spec in enumerate(specs):
        g = batch.dataset == k
        a = batch.dataset[batch.batch] == k
        table = torch.zeros(119, dtype=torch.float64)
        for z, v in spec.element_references.items():
            table[z] = v
        ref = torch.zeros(batch.num_graphs, dtype=torch.float64).index_add_(0, batch.batch, table[batch.numbers])
        base = ref + mean_residual[spec.name] * batch.n_atoms  # E_base = Σ ref + r̄·N
        energy = energy_per_atom_mae(base, batch.energy.double(), g, batch.n_atoms)
        forces = force_norm_mae(torch.zeros_like(batch.forces), batch.forces, a)
        result[f"{spec.name}/energy_per_atom_mae_meV_atom"] = float(energy) * 1e3
        result[f"{spec.name}/force_norm_mae_meV_A"] = float(forces) * 1e3
    return result


def train(variant: str, backbone: str, specs, train_batches, steps: int, lr: float, seed: int) -> MultiTaskModel:
    name, options = BACKBONES[backbone]
    torch.manual_seed(seed)
    denoise = DenoisingConfig(enabled=variant == "denoise_then_finetune")
    heads = HeadsConfig(per_dataset=variant != "single_head", hidden=(32,), vector_hidden=16, denoising=denoise)
    model = MultiTaskModel(MultiTaskConfig(name, specs, heads, options))
    objective = MultiTaskObjective(
        ObjectiveConfig(balancing="uncertainty" if variant == "uncertainty" else "static", stress_weight=0.0), specs
    )
    params = [p for p in itertools.chain(model.parameters(), objective.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-3)
    for step in range(steps):
        if variant == "denoise_then_finetune" and step == steps // 2:
            model.denoise_head.requires_grad_(False)
            model.denoise_head = None  # fine-tuning stage: plain E/F on the same data
        model.train()
        batch = train_batches[step % len(train_batches)]
        loss, _ = objective(model(batch, compute_stress=False), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="matris")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-graphs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--variants", nargs="*", default=["per_dataset_static", "single_head", "uncertainty", "denoise_then_finetune"])
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_frames(REAL)
    names = list(data)
    ids = {n: k for k, n in enumerate(names)}
    rng = np.random.default_rng(args.seed)
    train_frames, val_frames, specs = [], [], []
    for name in names:
        frames = [data[name][i] for i in rng.permutation(len(data[name]))]
        n_val = max(1, len(frames) // 4)
        val_frames += frames[:n_val]
        train_frames += frames[n_val:]
        specs.append(fit_spec(name, frames[n_val:]))
    cutoff = BACKBONES[args.backbone][1].get("cutoff", 6.0)
    order = rng.permutation(len(train_frames))
    train_batches = [
        collate([train_frames[i] for i in order[s : s + args.batch_graphs]], dataset_ids=ids, cutoff=cutoff, three_body_cutoff=4.0)
        for s in range(0, len(order), args.batch_graphs)
    ]
    val = collate(val_frames, dataset_ids=ids, cutoff=cutoff, three_body_cutoff=4.0)
    mean_residual = {  # the baseline's mean residual per atom, from training frames only
        s.name: float(np.mean([
            (f.energy - sum(s.element_references[int(z)] for z in f.numbers)) / f.natoms
            for f in train_frames if f.dataset == s.name
        ]))
        for s in specs
    }
    emit({"bench": "ablation", "variant": "mean_baseline", "backbone": args.backbone, **baseline(val, specs, mean_residual)}, args.json_out)
    for variant in args.variants:
        start = time.perf_counter()
        model = train(variant, args.backbone, specs, train_batches, args.steps, args.lr, args.seed)
        emit(
            {
                "bench": "ablation",
                "variant": variant,
                "backbone": args.backbone,
                "steps": args.steps,
                "train_s": round(time.perf_counter() - start, 1),
                **{k: round(v, 2) for k, v in evaluate(model, val, names).items()},
                "peak_rss_mb": round(peak_rss_mb(), 1),
            },
            args.json_out,
        )
    return 0
