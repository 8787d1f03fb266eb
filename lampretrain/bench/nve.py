"""NVE energy drift of random-weight backbones on one periodic cell (ASE VelocityVerlet, float64).

    python -m lampretrain.bench.nve   (or: lampretrain bench nve) --timesteps 0.5 1 --time-ps 0.2

Each model (``matris-smooth``, ``matris-published``: MatRIS with ``smooth`` true/false, equal to the official
code on the same weights; ``dpa4``) is built small (the sizes of tests/test_smoothness.py) at its released
cutoffs (MatRIS 6 / 4.5 Å, DPA4 6 Å), every weight perturbed by N(0, 0.1) with one seed, and run from the same
rattled 32-atom fcc Cu cell at 300 K. One JSON line per model and timestep: ``drift_mev_atom_ps`` (slope of the
least-squares line through E_total(t)/N), ``max_abs_mev_atom`` (max |E(t) − E(0)|/N) and ``crossings`` (steps
at which the number of edges or angles changed: how often a cutoff was crossed).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lampretrain.bench.common import emit

MATRIS = dict(num_layers=2, atom_dim=16, bond_dim=12, angle_dim=8, readout_hidden=(16, 8), magmom_hidden=8)
DPA4 = dict(channels=8, lmax=2, n_blocks=2, so2_layers=1, n_focus=1, rank=1, ffn_hidden=16, n_radial=8,
            n_elements=30)
MODELS = ("matris-smooth", "matris-published", "dpa4")


def random_model(kind: str, seed: int) -> torch.nn.Module:
    """A small float64 one-dataset model with every weight perturbed by N(0, 0.1)."""
    from lampretrain.models.multitask import DatasetSpec, HeadsConfig, MultiTaskConfig, MultiTaskModel

    torch.manual_seed(seed)
    if kind == "dpa4":
        name, options, heads = "dpa4-air", DPA4, (8,)
    else:
        name, options, heads = "matris-4m", {**MATRIS, "smooth": kind == "matris-smooth"}, MATRIS["readout_hidden"]
    model = MultiTaskModel(MultiTaskConfig(name, [DatasetSpec("default")], HeadsConfig(hidden=heads), options))
    model = model.to(torch.float64).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def cu_cell(seed: int):
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))  # 32 atoms
    atoms.rattle(0.05, seed=seed)
    return atoms


def run(kind: str, dt_fs: float, time_ps: float, seed: int) -> dict:
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet

    from lampretrain.frames import Frame
    from lampretrain.graph.batch import collate
    from lampretrain.inference import Calculator

    model = random_model(kind, seed)
    cutoff, three_body = model.backbone.cutoff, model.backbone.three_body_cutoff
    atoms = cu_cell(seed)
    atoms.calc = Calculator(model, dtype=torch.float64)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(seed))
    Stationary(atoms)
    energies, sizes = [], []

    def record():
        energies.append(atoms.get_total_energy())
        frame = Frame(positions=atoms.positions, numbers=atoms.numbers, cell=atoms.cell.array, pbc=atoms.pbc)
        batch = collate([frame], cutoff=cutoff, three_body_cutoff=three_body)
        sizes.append((batch.num_edges, batch.num_angles))

    steps = round(time_ps * 1000 / dt_fs)
    start = time.perf_counter()
    md = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
    md.attach(record, interval=1)  # ASE calls it before the first step too: E(0)
    md.run(steps)
    seconds = time.perf_counter() - start
    per_atom_mev = 1000 * (np.array(energies) - energies[0]) / len(atoms)
    t_ps = np.arange(len(per_atom_mev)) * dt_fs / 1000
    slope = float(np.polyfit(t_ps, per_atom_mev, 1)[0])
    return {
        "bench": "nve", "model": kind, "atoms": len(atoms), "dt_fs": dt_fs, "steps": steps, "time_ps": time_ps,
        "cutoffs": [cutoff, three_body], "seed": seed, "drift_mev_atom_ps": round(slope, 4),
        "max_abs_mev_atom": round(float(np.abs(per_atom_mev).max()), 5),
        "crossings": int(np.count_nonzero(np.any(np.diff(np.array(sizes), axis=0) != 0, axis=1))),
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--timesteps", type=float, nargs="+", default=[0.5, 1.0], help="fs")
    p.add_argument("--time-ps", type=float, default=0.2, help="simulated time per run (default 0.2 ps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    for kind in args.models:
        for dt in args.timesteps:
            emit(run(kind, dt, args.time_ps, args.seed), args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
