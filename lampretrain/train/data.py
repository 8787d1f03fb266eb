"""The data of one rank: the training stream (store rows → cost-balanced sampler → DataLoader of graph
batches) and the validation batches (this rank's share of the val split, every frame once).

The store holds positions, not graphs: graphs are built in the loader, at the model's
cutoffs when they are given (:meth:`TrainData.use_cutoffs`, ``build_val_loader(cutoffs=...)``),
else at the cutoffs the store was prepared with. The store's cutoffs then only serve
its per-frame edge/angle counts, which feed the sampler's cost model.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import ConfigError
from ..graph.batch import GraphBatch
from ..graph.datasets import GraphCollate, LmdbFrameDataset
from ..recipe import DataSection
from ..sampling import BalancedBatchSampler, CostModel, dataset_weights, weights_from_mapping
from ..store.index import StoreIndex


# Slurm (time limit, scancel, preemption) and Kubernetes signal every process of a job, and torchrun signals
# each rank's whole process group: loader workers get the preemption signal too. Left to torch, a worker dies
# on SIGTERM and the trainer fails with "DataLoader worker ... killed by signal" instead of checkpointing.
WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _ignore_preemption(worker_id: int) -> None:
    """worker_init_fn: the trainer alone reacts to preemption; it stops its workers through the DataLoader.

    Runs after torch's own worker signal handlers (its SIGTERM one re-raises the default action), so it wins.
    The signals stay blocked from the fork (:class:`WorkerLoader`) to here: one sent meanwhile is discarded
    by SIG_IGN instead of killing a worker that has not got this far. Torch's fallback ``terminate()`` of a
    worker that does not join is thereby a no-op; such a worker still leaves once the trainer has gone (torch's
    worker watchdog checks its parent every few seconds).
    """
    for sig in WORKER_IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORED_SIGNALS)


class WorkerLoader(DataLoader):
    """A DataLoader whose worker processes leave SIGTERM, SIGUSR1 and SIGINT to the trainer.

    Workers are forked when an iteration starts (every epoch, every validation), so the signals are blocked
    in the trainer's thread around that; a signal that comes then waits for the unblock and reaches the
    trainer's handler a few milliseconds late, and the workers inherit the block (see ``_ignore_preemption``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, worker_init_fn=_ignore_preemption, **kwargs)

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        before = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


class _Rows(Dataset):
    """Item i of the sampler is store row ``rows[i]`` of ``frames`` (split rows, filtered)."""

    def __init__(self, frames: LmdbFrameDataset, keep: np.ndarray):
        self.frames, self.keep = frames, keep

    def __len__(self) -> int:
        return int(self.keep.size)

    def __getitem__(self, i: int):
        return self.frames[int(self.keep[i])]


@dataclass
class TrainData:
    index: StoreIndex
    datasets: list[str]  # names in head order (dataset id k of a batch is datasets[k])
    sampler: BalancedBatchSampler
    loader: DataLoader
    natoms: np.ndarray  # per sampler item
    collate: GraphCollate

    def use_cutoffs(self, cutoff: float, three_body_cutoff: float) -> None:
        """Build the stream's graphs at these cutoffs (Å; the model's) instead of the store's.

        Takes effect for every epoch that :meth:`stream` starts afterwards: the
        DataLoader hands its workers the collate function when an epoch begins.
        """
        self.collate.cutoff, self.collate.three_body_cutoff = float(cutoff), float(three_body_cutoff)

    def stream(self, epoch: int, position: int) -> Iterator[tuple[int, int, GraphBatch]]:
        """(epoch, micro-batches consumed in that epoch, batch) forever, from (epoch, position) on.

        The sampler is positioned explicitly before each epoch, so a resumed
        run continues exactly where the checkpoint's position says, however far
        the DataLoader had prefetched.
        """
        while True:
            self.sampler.load_state_dict({"epoch": epoch, "position": position})
            for packed in self.loader:
                position += 1
                yield epoch, position, packed.unpack()
            epoch, position = epoch + 1, 0


def _selected(index: StoreIndex, cfg: DataSection, names: list[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    """(positions within the split's rows, their store dataset ids) of the split's frames of ``names``
    within ``max_natoms``."""
    unknown = sorted(set(names) - set(index.datasets))
    if unknown:
        raise ConfigError(f"data.datasets names {unknown}, not in store {cfg.store} (has {index.datasets})")
    rows = index.rows(split)
    store_ds = np.asarray(index.dataset[rows], dtype=np.int64)
    keep = np.isin(store_ds, [index.datasets.index(n) for n in names])
    if cfg.max_natoms is not None:
        keep &= index.natoms[rows] <= cfg.max_natoms
    keep = np.nonzero(keep)[0]
    return keep, store_ds[keep]


def build_train_data(cfg: DataSection, rank: int, world_size: int, seed: int) -> TrainData:
    index = StoreIndex.open(cfg.store)
    names = cfg.datasets or index.datasets
    keep, kept_ds = _selected(index, cfg, names, cfg.split)
    if keep.size == 0:
        raise ConfigError(f"data: no '{cfg.split}' frames left in {cfg.store} for datasets {names} (max_natoms={cfg.max_natoms})")
    rows = index.rows(cfg.split)
    frames = LmdbFrameDataset.from_index(index, cfg.split)
    wanted = np.array([index.datasets.index(n) for n in names])
    sel = rows[keep]
    remap = np.full(len(index.datasets), -1, dtype=np.int64)
    remap[wanted] = np.arange(len(names))
    head_ds = remap[kept_ds]
    cost = CostModel(cfg.cost.atoms, cfg.cost.edges, cfg.cost.angles)(index.natoms[sel], index.n_edges[sel], index.n_angles[sel])
    sizes = np.bincount(head_ds, minlength=len(names))
    s = cfg.sampling
    if s.strategy == "explicit":
        weights = weights_from_mapping(names, s.ratios)
    elif s.strategy == "proportional" and s.epoch_size is None:
        weights = None
    else:
        weights = dataset_weights(sizes, s.strategy, s.temperature)
    sampler = BalancedBatchSampler(
        cost, cfg.budget, rank, world_size, dataset=head_ds, weights=weights, epoch_size=s.epoch_size, seed=seed
    )
    collate = GraphCollate(index.cutoff, index.three_body_cutoff, {n: k for k, n in enumerate(names)}, packed=True)
    loader = WorkerLoader(
        _Rows(frames, keep),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),  # iter(loader) draws a seed: keep it off the global RNG
    )
    return TrainData(index, list(names), sampler, loader, np.asarray(index.natoms[sel]), collate)


def build_val_loader(
    cfg: DataSection, names: list[str], rank: int, world_size: int, cutoffs: tuple[float, float] | None = None
) -> DataLoader | None:
    """This rank's share of the val split of datasets ``names`` (head order) as graph batches; None if it is empty.

    ``cutoffs``: (pair, three-body) in Å the graphs are built at (the model's); default the store's.

    Rank r takes every world_size-th frame from r, in index order, packed
    greedily into micro-batches of at most ``cfg.budget`` cost (a costlier
    frame goes alone), so across ranks every val frame is evaluated exactly
    once. Ranks may get different numbers of batches: evaluation has no
    collective per batch.
    """
    index = StoreIndex.open(cfg.store)
    keep, _ = _selected(index, cfg, names, "val")
    if keep.size == 0:
        return None
    mine = keep[rank::world_size]
    sel = index.rows("val")[mine]
    cost = CostModel(cfg.cost.atoms, cfg.cost.edges, cfg.cost.angles)(index.natoms[sel], index.n_edges[sel], index.n_angles[sel])
    batches: list[list[int]] = []
    load = float("inf")
    for i, c in enumerate(cost):
        if load + c > cfg.budget:
            batches.append([])
            load = 0.0
        batches[-1].append(i)
        load += c
    pair, three_body = cutoffs if cutoffs is not None else (index.cutoff, index.three_body_cutoff)
    collate = GraphCollate(pair, three_body, {n: k for k, n in enumerate(names)})
    return WorkerLoader(
        _Rows(LmdbFrameDataset.from_index(index, "val"), mine), batch_sampler=batches, collate_fn=collate,
        num_workers=cfg.workers, pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(0),  # iter(loader) draws a seed: validation leaves the global RNG alone
    )
