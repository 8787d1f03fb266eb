"""Rank balance of batch strategies on a simulated MPtrj-like size distribution (pure numpy, no data needed).

    python benchmarks/balance.py   (or: lampretrain bench balance) --ranks 64 --strategy cost
    lampretrain bench balance --ranks 512 --strategy atoms --json-out benchmarks/results/balance.jsonl

Prints one JSON line per strategy: ``bench, ranks, strategy, max_over_mean,
dropped`` plus the worst and 95th-percentile step, steps, frames and budget.
``max_over_mean`` is the mean over steps of (slowest rank's cost / mean rank
cost) measured with the *cost model*, i.e. what a step really waits for.

Strategies, all at the same mean work per rank:

- ``count``: a fixed number of structures per rank (DistributedSampler; the
  incomplete last step is dropped, as ``drop_last=True`` does);
- ``atoms``: the balanced sampler budgeting atoms only (what fairchem's
  samplers balance);
- ``cost``: the balanced sampler budgeting cost = a·atoms + b·edges + c·angles.

The ``mptrj`` distribution (documented approximation, not the raw histogram):

- atoms per structure: log-normal, median 24, σ_ln = 0.75 (mean ≈ 32),
  rounded and clipped to MPtrj's published range 1..444 atoms;
- edges = atoms × ρ × (4/3)π·6³ at a 6 Å cutoff, with per-structure number
  density ρ log-normal around 0.06 atoms/Å³ (σ_ln = 0.3; inorganic solids span
  roughly 0.03..0.12);
- angles = atoms × k(k−1) with k = ρ × (4/3)π·4.5³ bonds inside the 4.5 Å
  three-body cutoff (MatRIS counts ordered pairs);
- default cost coefficients a, b, c = 1, 0.1, 0.01, which make a typical atom's
  edge and angle terms each about 5× its atom term (bond-pair-dominated like
  MatRIS); ``--cost`` sets others (e.g. fitted by ``lampretrain bench cost``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from lampretrain.bench.common import emit, peak_rss_mb
from lampretrain.sampling import BalancedBatchSampler, CostModel

SPHERE_6 = 4.0 / 3.0 * np.pi * 6.0**3
SPHERE_45 = 4.0 / 3.0 * np.pi * 4.5**3


def mptrj_like(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(atoms, edges, angles) of ``n`` simulated structures (see module docstring)."""
    rng = np.random.default_rng(seed)
    atoms = np.clip(np.rint(rng.lognormal(np.log(24.0), 0.75, n)), 1, 444).astype(np.int64)
    density = 0.06 * rng.lognormal(0.0, 0.3, n)
    edges = np.rint(atoms * density * SPHERE_6).astype(np.int64)
    k = density * SPHERE_45
    angles = np.rint(atoms * k * np.maximum(k - 1.0, 0.0)).astype(np.int64)
    return atoms, edges, angles


def fixed_count_loads(cost: np.ndarray, order: np.ndarray, ranks: int, per_rank: int) -> tuple[np.ndarray, int]:
    """(steps, ranks) costs of consecutive fixed-size batches, and how many structures the last partial step drops."""
    per_step = ranks * per_rank
    steps = order.size // per_step
    used = order[: steps * per_step]
    return cost[used].reshape(steps, ranks, per_rank).sum(axis=2), int(order.size - used.size)


def run(ranks: int, strategy: str, budget_atoms: float, steps: int, cost_model: CostModel, seed: int) -> dict:
    mean_atoms = np.exp(np.log(24.0) + 0.75**2 / 2)
    frames = max(20_000, int(steps * ranks * budget_atoms / mean_atoms))
    atoms, edges, angles = mptrj_like(frames, seed)
    true_cost = cost_model(atoms, edges, angles)
    t0 = time.perf_counter()
    oversize = padded = 0
    if strategy == "count":
        per_rank = max(1, int(round(budget_atoms / atoms.mean())))
        order = np.random.default_rng(seed + 1).permutation(frames)
        loads, dropped = fixed_count_loads(true_cost, order, ranks, per_rank)
        budget = float(per_rank)
    else:
        packed = atoms.astype(np.float64) if strategy == "atoms" else true_cost
        # the same mean work per rank: the budget is budget_atoms of the average atom's cost
        budget = budget_atoms * (1.0 if strategy == "atoms" else true_cost.sum() / atoms.sum())
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = BalancedBatchSampler(packed, budget, world_size=ranks, seed=seed).plan(0, ranks=range(ranks))
        loads = np.add.reduceat(true_cost[plan.items], plan.offsets[:-1]).reshape(plan.steps, ranks)
        dropped = int(frames - np.unique(plan.items).size)
        oversize, padded = int(plan.oversize.size), plan.padded
    ratio = loads.max(axis=1) / loads.mean(axis=1)
    return {
        "bench": "balance",
        "ranks": ranks,
        "strategy": strategy,
        "max_over_mean": round(float(ratio.mean()), 4),
        "dropped": dropped,
        "p95_max_over_mean": round(float(np.percentile(ratio, 95)), 4),
        "worst_step": round(float(ratio.max()), 4),
        "steps": int(loads.shape[0]),
        "frames": frames,
        "budget": round(budget, 2),
        "oversize": oversize,
        "padded": padded,
        "distribution": "mptrj",
        "cost": [cost_model.atoms, cost_model.edges, cost_model.angles],
        "plan_s": round(time.perf_counter() - t0, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 512])
    p.add_argument("--distribution", choices=["mptrj"], default="mptrj")
    p.add_argument("--strategy", choices=["count", "atoms", "cost", "all"], default="all")
    p.add_argument("--budget-atoms", type=float, default=1000.0, help="per-rank budget in average atoms (default 1000)")
    p.add_argument("--steps", type=int, default=40, help="about this many steps are simulated")
    p.add_argument("--cost", default="1,0.1,0.01", help="a,b,c of cost = a·atoms + b·edges + c·angles")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    a, b, c = (float(x) for x in args.cost.split(","))
    model = CostModel(atoms=a, edges=b, angles=c)
    strategies = ["count", "atoms", "cost"] if args.strategy == "all" else [args.strategy]
    for ranks in args.ranks:
        for strategy in strategies:
            emit(run(ranks, strategy, args.budget_atoms, args.steps, model, args.seed), args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
