"""Stage 2 of prep, one process: dedup, split and shard assignment from the part metadata.

Everything here is a pure function of the part files in task order, so a
resumed or re-run prep plans exactly the same shards and index.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..store.index import COLUMNS, HAS_ENERGY, HAS_FORCES, HAS_MAGMOMS, HAS_STRESS, SPLITS
from .spec import SplitSpec


@dataclass
class Planned:
    """One record that goes into the store."""

    task: int
    dataset: int
    meta: dict[str, Any]
    split: int = 0
    shard: int = 0
    key: int = 0


@dataclass
class Plan:
    records: list[Planned]  # store order: split-major, then input order
    shards: list[dict[str, Any]]  # {split, shard, rows: (start, stop)}
    duplicates: list[dict[str, str]] = field(default_factory=list)


def split_of(key: str, split: SplitSpec) -> int:
    """0/1/2 (train/val/test) from a uniform number derived from ``key`` and the salt."""
    digest = hashlib.blake2b((split.salt + "\0" + key).encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2.0**64
    if u < split.test:
        return 2
    if u < split.test + split.val:
        return 1
    return 0


def plan_store(
    metas: list[tuple[int, int, dict[str, Any]]], split: SplitSpec, dedup: bool, shard_bytes: int
) -> Plan:
    """``metas``: (task, dataset id, frame meta) in input order → the store's layout."""
    seen: dict[tuple[int, str], str] = {}
    kept: list[Planned] = []
    duplicates = []
    for task, dataset, meta in metas:
        if dedup:
            key = (dataset, meta["hash"])
            if key in seen:
                duplicates.append({"source": meta["source"], "kind": "duplicate", "reason": f"duplicate of {seen[key]}"})
                continue
            seen[key] = meta["source"]
        planned = Planned(task, dataset, meta)
        planned.split = split_of(meta["group"] if meta["group"] is not None else meta["hash"], split)
        kept.append(planned)
    ordered = sorted(kept, key=lambda p: p.split)  # stable: input order within a split
    shards = []
    row = 0
    for s in range(len(SPLITS)):
        members = [p for p in ordered if p.split == s]
        shard, size, start = 0, 0, row
        for p in members:
            if size and size + p.meta["length"] > shard_bytes:
                shards.append({"split": SPLITS[s], "shard": shard, "rows": (start, row)})
                shard, size, start = shard + 1, 0, row
            p.shard, p.key = shard, row - start
            size += p.meta["length"]
            row += 1
        if members:
            shards.append({"split": SPLITS[s], "shard": shard, "rows": (start, row)})
    return Plan(ordered, shards, duplicates)


def index_columns(plan: Plan) -> dict[str, np.ndarray]:
    """The index columns (store/index.py COLUMNS) for the planned records."""
    recs = plan.records
    counts = np.array([len(p.meta["z"]) for p in recs], dtype=np.int64)
    bits = np.array([HAS_ENERGY, HAS_FORCES, HAS_STRESS, HAS_MAGMOMS], dtype=np.uint8)
    labels = np.array([p.meta["labels"] for p in recs], dtype=bool).reshape(-1, 4)
    columns = {
        "split": [p.split for p in recs],
        "shard": [p.shard for p in recs],
        "key": [p.key for p in recs],
        "natoms": [p.meta["natoms"] for p in recs],
        "n_edges": [p.meta["n_edges"] for p in recs],
        "n_angles": [p.meta["n_angles"] for p in recs],
        "dataset": [p.dataset for p in recs],
        "labels": (labels * bits).sum(axis=1),
        "hash": [p.meta["hash"].encode() for p in recs],
        "comp_ptr": np.concatenate([[0], np.cumsum(counts)]),
        "comp_z": [z for p in recs for z in p.meta["z"]],
        "comp_count": [c for p in recs for c in p.meta["count"]],
    }
    return {name: np.asarray(columns[name], dtype=dtype) for name, dtype in COLUMNS.items()}
