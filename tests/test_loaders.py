"""LMDB and WebDataset torch datasets deliver the same real frames; graphs from workers equal graphs built on the device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lampretrain.frames import Frame
from lampretrain.graph.batch import collate
from lampretrain.graph.datasets import GraphCollate, LmdbFrameDataset, WdsFrameDataset, budget_batches
from lampretrain.sampling import BalancedBatchSampler, CostModel
from lampretrain.store import LmdbShardWriter, WdsShardWriter

REAL = Path(__file__).parent / "data" / "real"
SHARDS = 3


def _real_frames() -> list[Frame]:
    """Oxides (periodic, energy+forces) and water (periodic, float32 source) with their labels."""
    from ase.db import connect

    frames = []
    for k, row in enumerate(connect(REAL / "fairchem_oxides_asedb" / "oxides.db").select(limit=24)):
        frames.append(
            Frame(row.positions, row.numbers, np.array(row.cell), row.pbc, energy=row.energy, forces=row.forces,
                  dataset="oxides", source=f"oxides.db#{row.id}")
        )
    water = REAL / "deepmd_water" / "data_0"
    numbers = np.where(np.loadtxt(water / "type.raw", dtype=int) == 0, 8, 1)
    coords = np.load(water / "set.000" / "coord.npy")[:4].reshape(4, -1, 3)
    boxes = np.load(water / "set.000" / "box.npy")[:4].reshape(4, 3, 3)
    energies = np.load(water / "set.000" / "energy.npy")[:4]
    for k in range(4):
        frames.append(Frame(coords[k], numbers, boxes[k], [True] * 3, energy=energies[k], dataset="water",
                            source=f"deepmd_water/data_0#{k}"))
    return frames


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Frames written round-robin into 3 LMDB and 3 tar shards; (frames, lmdb paths, shard, key, tar paths)."""
    root = tmp_path_factory.mktemp("store")
    frames = _real_frames()
    lmdb_paths = [root / f"train-{s:05d}.lmdb" for s in range(SHARDS)]
    tar_paths = [root / f"train-{s:05d}.tar" for s in range(SHARDS)]
    shard = np.arange(len(frames)) % SHARDS
    key = np.zeros(len(frames), dtype=np.int64)
    for s in range(SHARDS):
        with LmdbShardWriter(lmdb_paths[s]) as lw, WdsShardWriter(tar_paths[s]) as ww:
            for i in np.nonzero(shard == s)[0]:
                key[i] = lw.write(frames[i])
                ww.write(f"{i:06d}", frames[i])
    return frames, lmdb_paths, shard, key, [str(p) for p in tar_paths]


def _hashes(frames) -> list[str]:
    return [f.content_hash() + f.dataset for f in frames]


def test_lmdb_dataset_returns_each_frame(store):
    frames, lmdb_paths, shard, key, _ = store
    ds = LmdbFrameDataset(lmdb_paths, shard, key)
    assert len(ds) == len(frames)
    for i in (0, 5, len(frames) - 1):
        got = ds[i]
        np.testing.assert_array_equal(got.positions, frames[i].positions)
        np.testing.assert_array_equal(got.forces if got.forces is not None else [], frames[i].forces if frames[i].forces is not None else [])
        assert got.energy == frames[i].energy and got.dataset == frames[i].dataset
    assert _hashes(ds[i] for i in range(len(ds))) == _hashes(frames)
    with pytest.raises(ValueError, match="but 3 shards were given"):
        LmdbFrameDataset(lmdb_paths, shard + 1, key)


def test_wds_dataset_yields_the_same_frames(store):
    frames, _, shard, _, tars = store
    in_order = list(WdsFrameDataset(tars, rank=0, world_size=1))
    expected = [frames[i] for s in range(SHARDS) for i in np.nonzero(shard == s)[0]]
    assert _hashes(in_order) == _hashes(expected)
    shuffled = WdsFrameDataset(tars, shuffle_buffer=8, seed=3, rank=0, world_size=1)
    a = _hashes(shuffled)
    assert sorted(a) == sorted(_hashes(frames)) and a != _hashes(in_order)
    assert _hashes(shuffled) == a  # reproducible for (seed, epoch)
    shuffled.set_epoch(1)
    assert _hashes(shuffled) != a


def test_wds_split_per_rank_and_worker(store):
    frames, _, _, _, tars = store
    seen = []
    for rank in range(2):
        ds = WdsFrameDataset(tars, shuffle_buffer=4, seed=1, rank=rank, world_size=2)
        loader = DataLoader(ds, batch_size=None, num_workers=2, collate_fn=lambda f: f)
        seen.append(_hashes(loader))
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(_hashes(frames))


def test_loader_graphs_in_workers_equal_device_graphs(store):
    pytest.importorskip("vesin_torch")
    frames, lmdb_paths, shard, key, _ = store
    ds = LmdbFrameDataset(lmdb_paths, shard, key)
    assert ds[0].natoms > 0  # the parent opens the shards first: workers must reopen them after fork
    natoms = np.array([f.natoms for f in frames])
    sampler = BalancedBatchSampler(CostModel()(natoms), budget=400.0, seed=0)
    ids = {"oxides": 0, "water": 1}
    cpu = GraphCollate(6.0, 4.5, dataset_ids=ids, dtype=torch.float64)
    on_device = GraphCollate(6.0, 4.5, dataset_ids=ids, dtype=torch.float64, on_device=True)
    steps = sampler.plan(0)
    cpu_batches = list(DataLoader(ds, batch_sampler=sampler, num_workers=2, collate_fn=cpu))
    assert len(cpu_batches) == steps.steps
    sampler.set_epoch(0)
    bare = list(DataLoader(ds, batch_sampler=sampler, num_workers=2, collate_fn=on_device))
    assert sum(b.num_graphs for b in cpu_batches) == len(frames)
    for s, (a, b) in enumerate(zip(cpu_batches, bare)):
        assert b.num_edges == 0
        direct = collate([frames[i] for i in steps.batch(s, 0)], dataset_ids=ids, dtype=torch.float64)
        assert torch.equal(a.edge_index, direct.edge_index) and torch.equal(a.energy, direct.energy)
        assert torch.equal(a.dataset, direct.dataset)
        built = on_device.finish(b, "cuda" if torch.cuda.is_available() else "cpu").to("cpu")
        for name in ("edge_index", "edge_shift", "edge_reverse", "angle_index", "positions"):
            assert torch.equal(getattr(built, name), getattr(a, name)), name


def test_budget_batches_keep_every_frame(store):
    frames = store[0]
    batches = list(budget_batches(frames, lambda f: f.natoms, budget=200))
    assert [f for b in batches for f in b] == frames
    assert all(sum(f.natoms for f in b) <= 200 or len(b) == 1 for b in batches)
    assert any(len(b) == 1 and b[0].natoms > 100 for b in batches)  # water (192 atoms) alone when needed
