"""Epoch planning at the scale of OMat24-sized stores, simulated ranks (no data, no GPU).

    lampretrain bench scale                                 # 10^6 and 10^7 frames at 8, 64, 512, 1024 ranks
    lampretrain bench scale --frames 1.1e8 --ranks 1024     # OMat24 size
    lampretrain bench scale --store stores/omat24 --ranks 64 --no-save   # a real store's train columns

The index is synthetic unless ``--store`` is given: ``natoms``/``n_edges``/``n_angles``
drawn from the MPtrj-like distribution of ``lampretrain/bench/balance.py`` and written
as a store index (the other columns are sparse zero files), so it is opened through
``StoreIndex.open`` as training opens it. Each case runs in a fresh process (spawned, so
that RSS is the case's own: the process opens the index memory-mapped, computes the
float32 cost column ``a·atoms + b·edges + c·angles`` chunk by chunk, closes the index,
then plans). Lines printed, one per case:

- ``scale_index``: ``open_s``/``open_rss_mb`` (``StoreIndex.open``), ``cost_s``/``cost_rss_mb``
  (the cost column from the mapped columns; the mapped pages count in RSS while open);
- ``scale``: exactly ``bench, frames, ranks, plan_s, plan_rss_mb, max_over_mean, dropped``:
  the time and peak RSS of one rank (rank 0) planning its epoch, from a process holding only
  the cost column; ``max_over_mean`` (mean over steps of the slowest rank's cost over the mean)
  and ``dropped`` (frames of the epoch in no batch) over all ranks, each rank planned by the
  same code in blocks afterwards;
- ``scale_resume``: ``resume_s``, a new sampler on the cost column loading (epoch 0, the middle
  step) until its first batch, and whether that batch is the uninterrupted run's;
- ``scale_detail``: steps, 95th percentile and worst step, mean fill of the budget, oversize
  structures, padded batches and the time of the all-ranks simulation.

The budget is ``--budget-atoms`` (default 1000) average atoms' cost per rank and step, as in
``bench balance``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from lampretrain.bench.balance import mptrj_like
from lampretrain.bench.common import emit, peak_rss_mb, reset_peak_rss
from lampretrain.sampling import BalancedBatchSampler, CostModel, OversizeWarning
from lampretrain.store.index import COLUMNS, STORE_SCHEMA, STORE_VERSION, StoreIndex

GENERATE = 1 << 22  # synthetic rows drawn per chunk (the whole index never sits in memory)
BLOCK_ITEMS = 1 << 24  # structures per block of simulated ranks (bounds the simulation's memory)


def synthetic_store(root: Path, frames: int, seed: int = 0) -> Path:
    """A store directory with only an index: MPtrj-like natoms/n_edges/n_angles, every row train, one dataset."""
    index = root / "index"
    index.mkdir(parents=True, exist_ok=True)
    lengths = {"comp_ptr": frames + 1, "comp_z": 0, "comp_count": 0}
    columns = {
        name: np.lib.format.open_memmap(index / f"{name}.npy", mode="w+", dtype=dtype, shape=(lengths.get(name, frames),))
        for name, dtype in COLUMNS.items()
    }  # written as sparse files: the columns not drawn below stay zero without using disk
    for k, a in enumerate(range(0, frames, GENERATE)):
        atoms, edges, angles = mptrj_like(min(frames, a + GENERATE) - a, seed=seed * 1_000_003 + k)
        columns["natoms"][a : a + atoms.size] = atoms
        columns["n_edges"][a : a + atoms.size] = edges
        columns["n_angles"][a : a + atoms.size] = angles
    for column in columns.values():
        column.flush()
    del columns
    manifest = {"schema": STORE_SCHEMA, "version": STORE_VERSION, "datasets": ["mptrj_like"], "cutoff": 6.0,
                "three_body_cutoff": 4.5, "shards": {"lmdb": [], "wds": []}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _cost_column(root: Path, model: CostModel) -> tuple[np.ndarray, float, dict]:
    """(float32 cost per train frame, mean cost per atom, index timings) from the store's mapped columns."""
    reset_peak_rss()
    t0 = time.perf_counter()
    index = StoreIndex.open(root)
    timing = {"open_s": round(time.perf_counter() - t0, 4), "open_rss_mb": round(peak_rss_mb(), 1)}
    rows = index.rows("train")
    cost = np.empty(rows.size, dtype=np.float32)
    cost_sum = atoms_sum = 0.0
    for a in range(0, rows.size, GENERATE):
        r = rows[a : a + GENERATE]
        natoms = index.natoms[r]
        c = model(natoms, index.n_edges[r], index.n_angles[r])
        cost[a : a + r.size] = c
        cost_sum, atoms_sum = cost_sum + float(c.sum()), atoms_sum + float(natoms.sum())
    timing.update(cost_s=round(time.perf_counter() - t0, 3), cost_rss_mb=round(peak_rss_mb(), 1))
    del index, rows
    return cost, cost_sum / max(atoms_sum, 1.0), timing


def measure(root: str, ranks: int, budget_atoms: float, model: tuple[float, float, float], seed: int) -> dict:
    """One case, in its own process: index and cost column, one rank's plan, resume, the all-ranks simulation."""
    warnings.simplefilter("ignore", OversizeWarning)
    cost, per_atom, index_timing = _cost_column(Path(root), CostModel(*model))
    budget = budget_atoms * per_atom
    reset_peak_rss()  # from here: what a rank holds (the cost column) and what planning adds
    t0 = time.perf_counter()
    plan = BalancedBatchSampler(cost, budget, rank=0, world_size=ranks, seed=seed).plan(0)
    plan_s, plan_rss = time.perf_counter() - t0, peak_rss_mb()
    middle = plan.steps // 2
    expected = plan.batch(middle, 0).tolist() if plan.steps else []
    del plan
    t0 = time.perf_counter()
    resumed = BalancedBatchSampler(cost, budget, rank=0, world_size=ranks, seed=seed)
    resumed.load_state_dict({"epoch": 0, "position": middle})
    first = next(iter(resumed), [])
    resume_s = time.perf_counter() - t0
    del resumed
    t0 = time.perf_counter()
    block = max(1, ranks * BLOCK_ITEMS // max(cost.size, 1))
    sim = BalancedBatchSampler(cost, budget, world_size=ranks, seed=seed)
    seen = np.zeros(cost.size, dtype=bool)
    loads, placed, padded, oversize = [], 0, 0, 0
    for r0 in range(0, ranks, block):
        part = sim.plan(0, ranks=range(r0, min(ranks, r0 + block)))
        loads.append(part.loads)
        seen[part.items] = True
        placed += part.items.size
        padded += part.padded
        oversize += part.oversize.size
        del part
    loads = np.concatenate(loads, axis=1)
    ratio = loads.max(axis=1) / np.maximum(loads.mean(axis=1), 1e-300)
    steps = int(loads.shape[0])
    return {
        "index": index_timing,
        "plan_s": round(plan_s, 3),
        "plan_rss_mb": round(plan_rss, 1),
        "max_over_mean": round(float(ratio.mean()), 4) if steps else 1.0,
        "dropped": int(cost.size - seen.sum()),
        "resume_s": round(resume_s, 3),
        "position": middle,
        "same_batch": first == expected,
        "steps": steps,
        "p95_max_over_mean": round(float(np.percentile(ratio, 95)), 4) if steps else 1.0,
        "worst_step": round(float(ratio.max()), 4) if steps else 1.0,
        "fill": round(float(loads.mean() / budget), 4) if steps else 0.0,
        "oversize": oversize,
        "padded": padded,
        "repeated": int(placed - padded - seen.sum()),
        "simulate_s": round(time.perf_counter() - t0, 2),
    }


def run_case(root: Path, frames: int, ranks: int, args: argparse.Namespace, model: tuple, first: bool) -> None:
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # a fresh interpreter: the RSS is this case's own
        r = pool.apply(measure, (str(root), ranks, args.budget_atoms, model, args.seed))
    if first:
        emit({"bench": "scale_index", "frames": frames, "store": str(args.store) if args.store else "synthetic",
              **r["index"]})
    emit({"bench": "scale", "frames": frames, "ranks": ranks, "plan_s": r["plan_s"], "plan_rss_mb": r["plan_rss_mb"],
          "max_over_mean": r["max_over_mean"], "dropped": r["dropped"]})
    emit({"bench": "scale_resume", "frames": frames, "ranks": ranks, "resume_s": r["resume_s"],
          "position": r["position"], "steps": r["steps"], "same_batch": r["same_batch"]})
    emit({"bench": "scale_detail", "frames": frames, "ranks": ranks, "budget_atoms": args.budget_atoms,
          "cost": list(model), **{k: r[k] for k in ("steps", "p95_max_over_mean", "worst_step", "fill", "oversize",
                                                     "padded", "repeated", "simulate_s")}})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=float, nargs="+", default=[1e6, 1e7], help="synthetic index sizes (1.1e8: OMat24)")
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 512, 1024])
    p.add_argument("--store", type=Path, help="a store whose train columns to plan instead of a synthetic index")
    p.add_argument("--budget-atoms", type=float, default=1000.0, help="per-rank budget in average atoms (default 1000)")
    p.add_argument("--cost", default="1,0.1,0.01", help="a,b,c of cost = a·atoms + b·edges + c·angles")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, help="where synthetic indexes are written (default: a temporary directory)")
    args = p.parse_args(argv)
    model = tuple(float(x) for x in args.cost.split(","))
    if args.store:
        frames = int(StoreIndex.open(args.store).rows("train").size)
        for k, ranks in enumerate(args.ranks):
            run_case(args.store, frames, ranks, args, model, first=k == 0)
        return 0
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in (int(f) for f in args.frames):
            root = synthetic_store(Path(tmp) / f"synthetic-{n}", n, args.seed)
            for k, ranks in enumerate(args.ranks):
                run_case(root, n, ranks, args, model, first=k == 0)
            for f in (root / "index").iterdir():  # the next size's index gets the disk space back
                f.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
