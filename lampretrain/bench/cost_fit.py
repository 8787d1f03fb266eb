"""Fit the load balancer's cost model (step time = a·atoms + b·edges + c·angles + overhead) from measured steps.

    lampretrain bench cost --model matris-4m --batches 16 --write recipes/cost-matris-4m.yaml

Batches of real structures with deliberately different shapes are timed (median of ``--repeat``
steps after a warm-up step each): crystals from the oxides fixture (3–24 atoms, dense: ~80 edges and
~900 bond pairs per atom), CHO molecules (7–10 atoms, ~6 edges per atom) and mixtures, so that atoms,
edges and angles are not collinear. :meth:`lampretrain.sampling.CostModel.fit` (non-negative least
squares) turns the measurements into coefficients. Prints one JSON line::

    bench, model, mode, batches, seconds_per {atoms, edges, angles, batch}, r2, cost {atoms, edges, angles}, points

``cost`` is the fit rescaled to atom units (the measured structures' mean cost per atom is 1), so a
recipe's ``data.budget`` keeps meaning "about this many atoms"; ``--write`` stores it as the YAML
block ``data: {cost: {...}}`` of a recipe (copy it in, or pass it as ``--set data.cost.atoms=...``).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

from .. import resources
from .common import emit, machine_descriptor, today

REAL = resources.path("tests/data/real")
CRYSTALS = REAL / "fairchem_oxides_asedb" / "oxides.db"
MOLECULES = REAL / "deepmd_nopbc_cho"


def fit_cost(natoms, n_edges, n_angles, seconds) -> dict:
    """Least-squares fit of seconds = a·atoms + b·edges + c·angles + d (a, b, c, d ≥ 0) with its R² and the
    coefficients rescaled so that the mean cost per atom of the measured batches is 1."""
    from ..sampling import CostModel

    x = np.column_stack([natoms, n_edges, n_angles]).astype(np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    model = CostModel.fit(x[:, 0], x[:, 1], x[:, 2], y)
    coef = np.array([model.atoms, model.edges, model.angles])
    predicted = x @ coef + model.per_batch
    ss_res = float(((y - predicted) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    per_atom = float((x @ coef).sum() / x[:, 0].sum())
    return {
        "seconds_per": {"atoms": model.atoms, "edges": model.edges, "angles": model.angles, "batch": model.per_batch},
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
        "cost": {name: float(c / per_atom) for name, c in zip(("atoms", "edges", "angles"), coef)},
    }


def batch_plan(crystals: list, molecules: list, n: int, max_frames: int, seed: int) -> list[list]:
    """``n`` batches cycling crystals only / molecules only / mixed, each of 1..max_frames random structures."""
    rng = np.random.default_rng(seed)
    pools = [crystals, molecules, crystals + molecules]
    plan = []
    for i in range(n):
        pool = pools[i % 3]
        k = int(rng.integers(1, max_frames + 1))
        plan.append([pool[j] for j in rng.choice(len(pool), size=k, replace=False)])
    return plan


def measure(model, frames: list, mode: str, repeat: int, cutoffs: tuple[float, float]) -> tuple[int, int, int, float]:
    from ..graph.batch import collate
    from .model_step import make_step, time_alternating

    batch = collate(frames, cutoff=cutoffs[0], three_body_cutoff=cutoffs[1])
    step = make_step(model, [batch], mode, "cpu", None)
    seconds = time_alternating({"step": step}, repeat=repeat, warmup=1, device="cpu")["step"]["median_s_per_step"]
    return int(batch.n_atoms.sum()), batch.num_edges, batch.num_angles, seconds


def write_yaml(path: Path, fit: dict, args: argparse.Namespace) -> None:
    import yaml

    header = (f"# cost model fitted by `lampretrain bench cost --model {args.model} --mode {args.mode}"
              f"{' --tiny' if args.tiny else ''}` on {today()} ({machine_descriptor()}), R² = {fit['r2']:.3f}\n"
              "# atom units: the measured structures' mean cost per atom is 1, so data.budget ≈ atoms per step\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump({"data": {"cost": fit["cost"]}}, sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    import torch

    from ..io import read_frames
    from ..models import build, graph_cutoffs
    from .scaling import TINY

    p = argparse.ArgumentParser(prog="lampretrain bench cost", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="matris-4m")
    p.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=True,
                   help="the demo-sized model of the scaling benchmark (default)")
    p.add_argument("--mode", choices=("train", "infer"), default="train", help="the step the balancer balances")
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--max-frames", type=int, default=8, help="structures per batch: 1..N")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", help="write the fitted coefficients (atom units) to this YAML file")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batches < 4:
        raise SystemExit("--batches: the fit has 4 unknowns, give at least 4 batches (8+ for a useful R²)")
    torch.manual_seed(args.seed)
    model = build(args.model, **(TINY.get(args.model, {}) if args.tiny else {}))
    cutoffs = graph_cutoffs(model)
    crystals = [f.validate() for f in read_frames(CRYSTALS)]
    molecules = [f.validate() for f in read_frames(MOLECULES)][::50]
    points = [measure(model, frames, args.mode, args.repeat, cutoffs)
              for frames in batch_plan(crystals, molecules, args.batches, args.max_frames, args.seed)]
    atoms, edges, angles, seconds = (np.array(c) for c in zip(*points))
    fit = fit_cost(atoms, edges, angles, seconds)
    if args.write:
        write_yaml(Path(args.write), fit, args)
    emit({
        "bench": "cost", "impl": "lampretrain", "model": args.model, "tiny": args.tiny, "mode": args.mode,
        "batches": len(points), "threads": torch.get_num_threads(), **fit,
        "median_s_per_step": statistics.median(seconds.tolist()),
        "points": [[int(a), int(e), int(g), round(float(s), 5)] for a, e, g, s in points],
        "written": args.write,
    }, args.json_out)
    return 0
