"""Loader throughput including graph building: LMDB and WebDataset shards through the torch DataLoader.

    python benchmarks/loader.py --format lmdb --workers 2 --batches 200
    lampretrain bench loader --store outputs/demo/store --format wds --workers 4

Without ``--store`` the 295 structures of the oxides fixture
(tests/data/real/fairchem_oxides_asedb) are written to temporary LMDB and tar
shards first, the same frames the issue's peer reference used (fairchem-core
2.24 AseDBDataset on an .aselmdb of this fixture, 6 Å graphs and its collater:
about 780 structures/s and 0.65 M edges/s in one process).

Prints JSON lines ``bench, impl, format, workers, graphs_per_s, edges_per_s,
peak_rss_mb`` (plus per-worker rates): ``impl=lampretrain`` (DataLoader +
GraphCollate building 6 Å edges and 4.5 Å bond pairs in the workers) and, as
the peer baseline on the same frames, ``impl=ase`` (ASE db rows +
``ase.neighborlist.neighbor_list``, one process). fairchem-core's own data
path is reported as skipped with the reason (see ``bench/peers.py``): it pins
lmdb<=1.7.3 and pulls CUDA packages into the environment.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from lampretrain import resources
from lampretrain.bench import peers
from lampretrain.bench.common import emit, peak_rss_mb, skipped
from lampretrain.frames import Frame
from lampretrain.graph.datasets import GraphCollate, LmdbFrameDataset, WdsFrameDataset
from lampretrain.store import LmdbShardWriter, WdsShardWriter

OXIDES = resources.path("tests/data/real/fairchem_oxides_asedb/oxides.db")


def _oxides_frames() -> list[Frame]:
    from ase.db import connect

    return [
        Frame(r.positions, r.numbers, np.array(r.cell), r.pbc, energy=r.energy, forces=r.forces, dataset="oxides")
        for r in connect(OXIDES).select()
    ]


def _write_fixture_store(root: Path, shards: int = 4) -> tuple[list[Path], np.ndarray, np.ndarray, list[str]]:
    frames = _oxides_frames()
    shard = np.arange(len(frames)) % shards
    key = np.zeros(len(frames), dtype=np.int64)
    lmdb_paths = [root / f"train-{s:05d}.lmdb" for s in range(shards)]
    tars = [root / f"train-{s:05d}.tar" for s in range(shards)]
    for s in range(shards):
        with LmdbShardWriter(lmdb_paths[s]) as lw, WdsShardWriter(tars[s]) as ww:
            for i in np.nonzero(shard == s)[0]:
                key[i] = lw.write(frames[i])
                ww.write(f"{i:08d}", frames[i])
    return lmdb_paths, shard, key, [str(t) for t in tars]


def _epochs(make_loader):
    for epoch in itertools.count():
        yield from make_loader(epoch)


def _measure(batches, n: int) -> tuple[float, int, int]:
    """Seconds for ``n`` batches after the first (worker start-up excluded), graphs and edges in them."""
    it = iter(batches)
    next(it)
    graphs = edges = 0
    t0 = time.perf_counter()
    for batch in itertools.islice(it, n):
        graphs += batch.num_graphs
        edges += batch.num_edges
    return time.perf_counter() - t0, graphs, edges


def bench_lampretrain(args, lmdb_paths, shard, key, tars, cutoff, three_body) -> dict:
    collate = GraphCollate(cutoff, three_body)
    common = dict(num_workers=args.workers, collate_fn=collate, persistent_workers=args.workers > 0)
    if args.format == "lmdb":
        ds = LmdbFrameDataset(lmdb_paths, shard, key)
        loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True, **common)
        seconds, graphs, edges = _measure(_epochs(lambda e: loader), args.batches)
    else:
        ds = WdsFrameDataset(tars, shuffle_buffer=args.batch_size * 4, rank=0, world_size=1)
        loader = DataLoader(ds, batch_size=args.batch_size, **common)

        def epoch_loader(e):
            ds.set_epoch(e)
            return loader

        seconds, graphs, edges = _measure(_epochs(epoch_loader), args.batches)
    workers = max(args.workers, 1)
    return _result("lampretrain", args, graphs / seconds, edges / seconds, workers)


def bench_ase(args, cutoff: float) -> dict:
    from ase.db import connect
    from ase.neighborlist import neighbor_list

    db = connect(OXIDES)
    ids = [r.id for r in db.select()]
    rng = np.random.default_rng(0)
    graphs = edges = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.seconds_ase:
        for k in rng.permutation(ids)[: args.batch_size]:
            atoms = db.get_atoms(id=int(k))
            i, j, s = neighbor_list("ijS", atoms, cutoff)
            torch.from_numpy(np.stack([i, j]))
            graphs += 1
            edges += i.size
    seconds = time.perf_counter() - t0
    return _result("ase", args, graphs / seconds, edges / seconds, 1, fmt="ase-db")


def _result(impl: str, args, graphs_per_s: float, edges_per_s: float, workers: int, fmt: str | None = None) -> dict:
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "bench": "loader",
        "impl": impl,
        "format": fmt or args.format,
        "workers": args.workers if impl == "lampretrain" else 0,
        "graphs_per_s": round(graphs_per_s, 1),
        "edges_per_s": round(edges_per_s, 1),
        "graphs_per_s_per_worker": round(graphs_per_s / workers, 1),
        "edges_per_s_per_worker": round(edges_per_s / workers, 1),
        "batch_size": args.batch_size,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_worker_rss_mb": round(children, 1),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", help="a prepped store (manifest.json); default: the oxides fixture in temporary shards")
    p.add_argument("--split", default="train")
    p.add_argument("--format", choices=["lmdb", "wds"], default="lmdb")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cutoff", type=float, default=None, help="graph cutoff (default: the store's, else 6 Å)")
    p.add_argument("--three-body-cutoff", type=float, default=None)
    p.add_argument("--seconds-ase", type=float, default=5.0, help="duration of the ASE baseline")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.store:
            from lampretrain.store.index import StoreIndex

            index = StoreIndex.open(args.store)
            rows = index.rows(args.split)
            lmdb_paths, shard, key = index.shard_paths("lmdb", args.split), index.shard[rows], index.key[rows]
            tars = [str(t) for t in index.shard_paths("wds", args.split)]
            cutoff, three_body = index.cutoff, index.three_body_cutoff
        else:
            lmdb_paths, shard, key, tars = _write_fixture_store(Path(tmp))
            cutoff, three_body = 6.0, 4.5
        cutoff = args.cutoff or cutoff
        three_body = args.three_body_cutoff or three_body
        emit(bench_lampretrain(args, lmdb_paths, shard, key, tars, cutoff, three_body), args.json_out)
        if not args.no_baseline and not args.store:
            emit(bench_ase(args, cutoff), args.json_out)
            module, reason = peers.load("fairchem")
            reason = reason or "fairchem-core imports, but its AseDBDataset side by side is not wired in yet"
            emit(skipped("loader", peers.PEERS["fairchem"].name, reason, format="aselmdb"), args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
