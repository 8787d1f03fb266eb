"""The data of one rank: the training stream (store rows → cost-balanced sampler → DataLoader of graph
batches) and the validation batches (this rank's share of the val split, every frame once).

``data.format`` picks how frames are read: ``lmdb`` (default) reads any frame at random from the LMDB shards
(:class:`~lampretrain.sampling.BalancedBatchSampler` over a random order of all frames); ``wds`` streams each
rank's tar shards front to back (:class:`~lampretrain.sampling.StreamBatchSampler`: the same balancing over an
order of shard segments, one window of ``data.wds.shuffle_buffer`` frames held at a time). Both plan from the
store index alone, so every rank has the same number of steps; both resume from (epoch, position).

The store holds positions, not graphs: graphs are built in the loader, at the model's
cutoffs (:meth:`TrainData.use_cutoffs`, ``build_val_loader(cutoffs=...)``); the store's cutoffs
only serve its per-frame edge/angle counts, which feed the sampler's cost model. Both select
their frames with :meth:`StoreIndex.select`.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import signal
import weakref
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..graph.batch import GraphBatch
from ..graph.datasets import GraphCollate, LmdbFrameDataset, StreamedFrames, WdsBatchSampler, WdsValBatches
from ..recipe import DataSection
from ..sampling import BalancedBatchSampler, CostModel, StreamBatchSampler, dataset_weights, weights_from_mapping
from ..store.index import StoreIndex
from ..store.wds_shards import ShardStream

# Slurm (time limit, scancel, preemption) and Kubernetes signal every process of a job, and torchrun signals
# each rank's whole process group: loader workers get the preemption signal too. Left to torch, a worker dies
# on SIGTERM and the trainer fails with "DataLoader worker ... killed by signal" instead of checkpointing.
WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _leave_preemption_to_the_trainer(worker_id: int, exiting: Event) -> None:
    """worker_init_fn: the trainer alone reacts to preemption; it stops its workers through the DataLoader.

    Runs after torch's own worker signal handlers (its SIGTERM one re-raises the default action), so it wins.
    SIGUSR1 and SIGINT are ignored; SIGTERM is ignored too unless ``exiting`` is set: the trainer sets it when it
    shuts these workers down or exits (:class:`WorkerLoader`), so torch's fallback ``terminate()`` and
    multiprocessing's terminate-and-join of daemon children at interpreter exit still end a worker, and a
    Ctrl-C'd trainer does not wait forever for one. The signals stay blocked from the fork to here: one sent
    meanwhile is discarded by SIG_IGN instead of killing a worker that has not got this far.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, functools.partial(_terminate_when_released, exiting))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORED_SIGNALS)


def _terminate_when_released(exiting: Event, sig: int, frame) -> None:
    if exiting.is_set():
        os._exit(128 + sig)


_RELEASES: weakref.WeakSet = weakref.WeakSet()  # the exiting events of live workers, set at interpreter exit


@atexit.register  # after multiprocessing's own exit hook in registration, so it runs before it
def _release_all_workers() -> None:
    for event in list(_RELEASES):
        event.set()


class WorkerLoader(DataLoader):
    """A DataLoader whose worker processes leave SIGTERM, SIGUSR1 and SIGINT to the trainer.

    Workers are forked when an iteration starts (every epoch, every validation), so the signals are blocked
    in the trainer's thread around that; a signal that comes then waits for the unblock and reaches the
    trainer's handler a few milliseconds late, and the workers inherit the block. Each iteration's workers
    get their own ``exiting`` event, set when that iteration shuts its workers down or the process exits.
    """

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        exiting = self.multiprocessing_context.Event() if self.multiprocessing_context else multiprocessing.Event()
        _RELEASES.add(exiting)
        self.worker_init_fn = functools.partial(_leave_preemption_to_the_trainer, exiting=exiting)
        before = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED_SIGNALS)
        try:
            iterator = super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)
        shutdown = iterator._shutdown_workers  # torch's; its terminate() fallback must be able to end a worker

        def release_then_shutdown():
            exiting.set()
            shutdown()

        iterator._shutdown_workers = release_then_shutdown
        return iterator


@dataclass
class TrainData:
    index: StoreIndex
    datasets: list[str]  # names in head order (dataset id k of a batch is datasets[k])
    sampler: BalancedBatchSampler | WdsBatchSampler
    loader: DataLoader
    collate: GraphCollate

    def use_cutoffs(self, cutoff: float, three_body_cutoff: float) -> None:
        """Build the stream's graphs at these cutoffs (Å; the model's) instead of the store's.

        Takes effect for every epoch that :meth:`stream` starts afterwards: the
        DataLoader hands its workers the collate function when an epoch begins.
        """
        self.collate.cutoff, self.collate.three_body_cutoff = float(cutoff), float(three_body_cutoff)

    def finish(self, batch: GraphBatch, device: torch.device) -> GraphBatch:
        """``batch`` on ``device``, its graph built there when ``data.graphs_on`` is ``device``."""
        return self.collate.finish(batch, device, non_blocking=True)

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


def build_train_data(cfg: DataSection, rank: int, world_size: int, seed: int) -> TrainData:
    index = StoreIndex.open(cfg.store)
    sel = index.select(cfg.split, cfg.datasets, cfg.max_natoms)
    rows, names = sel.rows, sel.names
    cost = CostModel(cfg.cost.atoms, cfg.cost.edges, cfg.cost.angles)(index.natoms[rows], index.n_edges[rows], index.n_angles[rows])
    sizes = np.bincount(sel.heads, minlength=len(names))
    s = cfg.sampling
    if s.strategy == "explicit":
        weights = weights_from_mapping(names, s.ratios)
    elif s.strategy == "proportional" and s.epoch_size is None:
        weights = None
    else:
        weights = dataset_weights(sizes, s.strategy, s.temperature)
    options = dict(dataset=sel.heads, weights=weights, epoch_size=s.epoch_size, seed=seed)
    collate = GraphCollate(index.cutoff, index.three_body_cutoff, {n: k for k, n in enumerate(names)},
                           on_device=cfg.graphs_on == "device", packed=True)
    if cfg.format == "wds":
        shard = np.asarray(index.shard[rows])
        sampler = StreamBatchSampler(cost, cfg.budget, rank, world_size, shard=shard, buffer=cfg.wds.shuffle_buffer,
                                     segment=cfg.wds.segment, **options)
        batches = WdsBatchSampler(sampler, ShardStream(cfg.wds_shard_urls(index, sel.split)), shard, rows)
        return stream_data(index, names, StreamedFrames(), batches, collate, cfg.workers, seed)
    sampler = BalancedBatchSampler(cost, cfg.budget, rank, world_size, **options)
    return stream_data(index, names, LmdbFrameDataset.from_rows(index, sel.split, rows), sampler, collate,
                       cfg.workers, seed)


def stream_data(index: StoreIndex, names: list[str], items: Dataset, sampler: BalancedBatchSampler | WdsBatchSampler,
                collate: GraphCollate, workers: int, seed: int) -> TrainData:
    """The training stream over ``items`` (store frames, or frames with more: property targets) in ``sampler``'s
    batches, collated in ``workers`` loader processes."""
    loader = WorkerLoader(
        items,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),  # iter(loader) draws a seed: keep it off the global RNG
    )
    return TrainData(index, names, sampler, loader, collate)


def build_val_loader(
    cfg: DataSection, names: list[str], rank: int, world_size: int, cutoffs: tuple[float, float]
) -> DataLoader | None:
    """This rank's share of the val split of datasets ``names`` (head order) as graph batches; None if it is empty.

    ``cutoffs``: (pair, three-body) in Å the graphs are built at (the model's).

    Rank r takes every world_size-th frame from r (``data.format: wds``: the r-th of world_size contiguous
    blocks, so it reads only its part of the val shards), in index order, packed
    greedily into micro-batches of at most ``cfg.budget`` cost (a costlier
    frame goes alone), so across ranks every val frame is evaluated exactly
    once. Ranks may get different numbers of batches: evaluation has no
    collective per batch.
    """
    index = StoreIndex.open(cfg.store)
    sel = index.select("val", names, cfg.max_natoms, required=False)
    if not len(sel):
        return None
    mine = np.array_split(sel.rows, world_size)[rank] if cfg.format == "wds" else sel.rows[rank::world_size]
    cost = CostModel(cfg.cost.atoms, cfg.cost.edges, cfg.cost.angles)(index.natoms[mine], index.n_edges[mine], index.n_angles[mine])
    batches: list[list[int]] = []
    load = float("inf")
    for i, c in enumerate(cost):
        if load + c > cfg.budget:
            batches.append([])
            load = 0.0
        batches[-1].append(i)
        load += c
    collate = GraphCollate(*cutoffs, {n: k for k, n in enumerate(names)})
    if cfg.format == "wds":
        stream = ShardStream(cfg.wds_shard_urls(index, "val"))
        items, batches = StreamedFrames(), WdsValBatches([mine[b] for b in batches], stream, index.shard)
    else:
        items = LmdbFrameDataset.from_rows(index, "val", mine)
    return WorkerLoader(
        items, batch_sampler=batches, collate_fn=collate,
        num_workers=cfg.workers, pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(0),  # iter(loader) draws a seed: validation leaves the global RNG alone
    )
