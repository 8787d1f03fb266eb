"""Prep throughput and read-back speed, side by side with writing/reading the same frames as an ASE db.

    lampretrain bench prep --input tests/data/real --workers 2

Prints JSON lines: lampretrain prep (frames/s and input MB/s, per worker too),
LMDB random access and WebDataset streaming read-back, and the peer path
(read the same sources and write every frame into an ASE db, then random
reads, as fairchem users build their datasets). Both paths read the raw files
with the same readers; prep also validates, deduplicates, counts edges and
angles for the index and writes two formats.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import resources
from .common import emit, peak_rss_mb

DEMO_SPEC = resources.path("data_prep/demo.yaml")


def _input_bytes(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        total += p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return total


def _spec(args: argparse.Namespace, out: Path):
    from ..prep.spec import SourceSpec, load_spec

    if args.input is None:
        spec = load_spec(DEMO_SPEC, {"output": str(out)}, base=resources.root())
    elif str(args.input).endswith((".yaml", ".yml")):
        spec = load_spec(args.input, {"output": str(out)})
    else:
        spec = load_spec(DEMO_SPEC, {"output": str(out)}, base=resources.root())
        spec.sources = [SourceSpec(path=str(args.input), dataset="bench")]
    return spec


def _source_paths(spec) -> list[Path]:
    paths = []
    for s in spec.sources:
        root = Path(s.path)
        paths += sorted(root.glob(s.include)) if s.include else [root]
    return paths


def _warm_imports() -> None:
    """Import the readers' libraries once so neither side of the comparison pays for them."""
    import ase.db  # noqa: F401
    import ase.io  # noqa: F401
    import pymatgen.core  # noqa: F401

    from .. import io  # noqa: F401


def bench_prep(spec, workers: int) -> dict[str, Any]:
    from ..prep.pipeline import prepare

    start = time.perf_counter()
    report = prepare(spec, workers=workers, progress=False, overwrite=True)
    seconds = time.perf_counter() - start
    mb = _input_bytes(_source_paths(spec)) / 2**20
    return {
        "bench": "prep",
        "impl": "lampretrain",
        "workers": workers,
        "frames": report["written"],
        "seconds": round(seconds, 3),
        "frames_per_s": report["written"] / seconds,
        "frames_per_s_per_worker": report["written"] / seconds / workers,
        "mb_per_s": mb / seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


def bench_read(store: Path) -> list[dict[str, Any]]:
    from ..store.index import SPLITS, StoreIndex
    from ..store.lmdb_shards import LmdbShardReader
    from ..store.wds_shards import WdsShardReader

    index = StoreIndex.open(store)
    readers = [LmdbShardReader(p) for split in SPLITS for p in index.shard_paths("lmdb", split)]
    order = [(r, k) for r in readers for k in range(len(r))]
    random.Random(0).shuffle(order)
    start = time.perf_counter()
    for reader, k in order:
        reader[k]
    lmdb_s = time.perf_counter() - start
    start = time.perf_counter()
    n = sum(1 for split in SPLITS for p in index.shard_paths("wds", split) for _ in WdsShardReader(p))
    wds_s = time.perf_counter() - start
    return [
        {"bench": "read", "impl": "lampretrain", "format": "lmdb", "access": "random", "frames": len(order),
         "frames_per_s": len(order) / lmdb_s},
        {"bench": "read", "impl": "lampretrain", "format": "wds", "access": "stream", "frames": n,
         "frames_per_s": n / wds_s},
    ]


def bench_ase_db(spec, workdir: Path) -> list[dict[str, Any]]:
    """The peer path (fairchem's dataset creation): read each source, write every frame into an ASE db
    (the aselmdb backend when installed, else SQLite), then read rows back at random."""
    import ase.db

    from ..io import read_frames
    from ..prep.pipeline import expand_tasks

    try:
        import ase_db_backends  # noqa: F401  (registers .aselmdb)

        path, backend = workdir / "peer.aselmdb", "aselmdb"
    except ImportError:
        path, backend = workdir / "peer.db", "sqlite"
    start = time.perf_counter()
    n = 0
    with ase.db.connect(path) as db:
        for task in expand_tasks(spec):
            for frame in read_frames(task.path, task.format, dataset=task.dataset, **dict(task.options)):
                db.write(frame.to_atoms())
                n += 1
    write_s = time.perf_counter() - start
    db = ase.db.connect(path)
    ids = list(range(1, n + 1))
    random.Random(0).shuffle(ids)
    start = time.perf_counter()
    for i in ids:
        db.get(id=i).toatoms()
    read_s = time.perf_counter() - start
    return [
        {"bench": "prep", "impl": f"ase-db-{backend}", "workers": 1, "frames": n,
         "frames_per_s": n / write_s, "frames_per_s_per_worker": n / write_s},
        {"bench": "read", "impl": f"ase-db-{backend}", "format": backend, "access": "random",
         "frames": n, "frames_per_s": n / read_s},
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lampretrain bench prep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="a prep spec YAML, or a file/directory of DFT data "
                        "(default: data_prep/demo.yaml, the bundled fixtures)")
    parser.add_argument("--workers", type=int, default=1, help="prep worker processes (default: %(default)s)")
    parser.add_argument("--no-peer", action="store_true", help="skip the ASE db comparison")
    parser.add_argument("--json-out", help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="lampretrain-bench-prep-"))
    try:
        spec = _spec(args, tmp / "store")
        _warm_imports()
        results = [bench_prep(spec, args.workers)]
        results += bench_read(tmp / "store")
        if not args.no_peer:
            results += bench_ase_db(spec, tmp)
        ours = {(r["bench"], r.get("format")): r for r in results if r["impl"] == "lampretrain"}
        for r in results:
            if r["impl"] != "lampretrain":
                mine = ours[("prep", None)] if r["bench"] == "prep" else ours[("read", "lmdb")]
                key = "frames_per_s_per_worker" if r["bench"] == "prep" else "frames_per_s"
                r["lampretrain_speedup"] = mine[key] / r[key]
        for r in results:
            emit(r, args.json_out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0
