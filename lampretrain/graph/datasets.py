"""Torch datasets over the store's shards and the collate function that turns frames into graph batches.

- :class:`LmdbFrameDataset`: map-style, one frame per (shard, key); use with
  :class:`~lampretrain.sampling.BalancedBatchSampler` as ``batch_sampler``.
  LMDB files are opened read-only without locks, lazily in each process
  (reopened after a DataLoader fork) by :mod:`lampretrain.store.lmdb_shards`.
- :class:`WdsBatchSampler`: the ``batch_sampler`` of a streamed epoch (``data.format: wds``): reads each
  window of this rank's :class:`~lampretrain.sampling.stream.StreamBatchSampler` plan from the tar shards
  (:class:`~lampretrain.store.wds_shards.ShardStream`) in the trainer's process and hands the loader its
  micro-batches as lists of frames; with :class:`StreamedFrames` as the dataset the loader workers only build
  graphs. Reading and decoding stay in one process, so a bad shard is one error line, every record is read
  once per epoch and the batches come in the plan's order whatever the number of workers.
  :class:`WdsValBatches` is the same for validation batches.
- :class:`WdsFrameDataset`: iterable over WebDataset tar shards through the webdataset pipeline, split
  shard-per-rank then shard-per-worker, with a shuffle buffer (the loader benchmark's baseline).
- :class:`GraphCollate`: the ``collate_fn``; builds graphs in the worker, or
  leaves them to :func:`lampretrain.graph.device.attach_graph` on the GPU
  (``on_device=True``) when the loader CPUs are the bottleneck.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..frames import Frame
from ..store.lmdb_shards import LmdbShardReader
from ..store.wds_shards import ShardStream, iter_wds_frames
from .batch import GraphBatch, PackedGraphBatch, collate, pack


class LmdbFrameDataset(Dataset):
    """Item ``i`` is record ``key[i]`` of shard ``shard_paths[shard[i]]`` (arrays as the store index holds them)."""

    def __init__(self, shard_paths: Sequence[str | os.PathLike], shard: np.ndarray, key: np.ndarray):
        self.readers = [LmdbShardReader(p) for p in shard_paths]
        self.shard = np.asarray(shard, dtype=np.int64)
        self.key = np.asarray(key, dtype=np.int64)
        if self.shard.shape != self.key.shape:
            raise ValueError(f"shard {self.shard.shape} and key {self.key.shape} arrays differ in shape")
        if self.shard.size and not 0 <= self.shard.min() <= self.shard.max() < len(self.readers):
            raise ValueError(f"shard numbers span {self.shard.min()}..{self.shard.max()} but {len(self.readers)} shards were given")

    @classmethod
    def from_index(cls, index, split: str = "train") -> "LmdbFrameDataset":
        """The ``split`` rows of a :class:`~lampretrain.store.index.StoreIndex`, in index order."""
        return cls.from_rows(index, split, index.rows(split))

    @classmethod
    def from_rows(cls, index, split: str, rows: np.ndarray) -> "LmdbFrameDataset":
        """Store rows ``rows`` of split ``split``, e.g. a :class:`~lampretrain.store.index.Selection`'s, in that order."""
        return cls(index.shard_paths("lmdb", split), index.shard[rows], index.key[rows])

    def __len__(self) -> int:
        return int(self.shard.size)

    def __getitem__(self, i: int) -> Frame:
        return self.readers[self.shard[i]][int(self.key[i])]


class StreamedFrames(Dataset):
    """The dataset of a streamed loader: its batch sampler hands over the frames themselves; item ``frame`` is
    ``frame``."""

    def __getitem__(self, frame: Frame) -> Frame:
        return frame


class WdsBatchSampler:
    """``batch_sampler`` of a streamed epoch: this rank's micro-batches of a
    :class:`~lampretrain.sampling.stream.StreamBatchSampler` plan as lists of frames, read window by window.

    ``shard``/``row``: per sampler frame, its shard number and store row. The position and epoch are the
    sampler's (``state_dict``/``load_state_dict`` are its): starting at step s reads window s // W from its
    first frame and skips the s mod W batches before s.
    """

    def __init__(self, sampler, stream: ShardStream, shard: np.ndarray, row: np.ndarray):
        self.sampler, self.stream = sampler, stream
        self.shard, self.row = np.asarray(shard, dtype=np.int64), np.asarray(row, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[Frame]]:
        s = self.sampler
        plan, epoch = s.plan(), s.epoch
        try:
            while s.position < plan.steps:
                window = s.position // plan.window_steps
                stream = plan.stream(window, s.rank)
                frames = dict(zip(stream.tolist(), self.stream.frames(self.shard[stream], self.row[stream])))
                for step in range(s.position, (window + 1) * plan.window_steps):
                    batch = plan.batch(step, s.rank).tolist()
                    s.position = step + 1
                    yield [frames[f] for f in batch]
                del frames
        finally:
            self.stream.close()
        s.set_epoch(epoch + 1)

    def state_dict(self, position: int | None = None) -> dict:
        return self.sampler.state_dict(position)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def plan(self, epoch: int | None = None, ranks: range | None = None):
        return self.sampler.plan(epoch, ranks)

    def mix(self, *args, **kwargs):
        return self.sampler.mix(*args, **kwargs)


class WdsValBatches:
    """``batch_sampler`` of validation batches from tar shards: ``batches`` of store rows (in store order, as
    :func:`~lampretrain.train.data.build_val_loader` cuts them) as lists of frames, read front to back."""

    def __init__(self, batches: list[np.ndarray], stream: ShardStream, shard_of_row):
        self.batches, self.stream, self.shard_of_row = batches, stream, shard_of_row

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[Frame]]:
        try:
            for rows in self.batches:
                yield self.stream.frames(self.shard_of_row[rows], rows)
        finally:
            self.stream.close()


class WdsFrameDataset(IterableDataset):
    """Frames streamed from tar shards: this rank's shards, then this worker's share of them, shuffled in a buffer.

    ``rank``/``world_size`` default to torch.distributed (or RANK/WORLD_SIZE);
    the DataLoader worker split is automatic. ``set_epoch`` changes shard and
    buffer order reproducibly for (seed, epoch, rank, worker).
    """

    def __init__(
        self,
        urls: Sequence[str | os.PathLike],
        shuffle_buffer: int = 0,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self.urls = [os.fspath(u) for u in urls]
        self.shuffle_buffer, self.seed = int(shuffle_buffer), int(seed)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    @classmethod
    def from_index(cls, index, split: str = "train", **options) -> "WdsFrameDataset":
        return cls([str(p) for p in index.shard_paths("wds", split)], **options)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Frame]:
        from webdataset.utils import pytorch_worker_info

        rank, world_size, _, _ = pytorch_worker_info()
        rank = rank if self.rank is None else self.rank
        world_size = world_size if self.world_size is None else self.world_size
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return iter_wds_frames(
            self.urls,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            epoch=self.epoch,
            rank=rank,
            world_size=world_size,
            worker=worker,
            num_workers=num_workers,
        )


def budget_batches(frames: Iterable[Frame], cost: Callable[[Frame], float], budget: float) -> Iterator[list[Frame]]:
    """Consecutive frames grouped while their summed ``cost`` stays within ``budget`` (a streaming micro-batcher).

    A frame costing more than the budget forms a batch of its own; nothing is dropped.
    """
    batch: list[Frame] = []
    load = 0.0
    for frame in frames:
        c = float(cost(frame))
        if batch and load + c > budget:
            yield batch
            batch, load = [], 0.0
        batch.append(frame)
        load += c
    if batch:
        yield batch


class GraphCollate:
    """``collate_fn`` turning a list of frames into a :class:`GraphBatch` (picklable for spawned workers).

    ``on_device=True`` skips the neighbor search in the worker; call
    ``attach_graph(batch.to(device), cutoff, three_body_cutoff)`` after the
    transfer (:meth:`finish` does exactly that). ``packed=True`` returns a
    :class:`~lampretrain.graph.batch.PackedGraphBatch` (one tensor to hand
    from a worker process instead of nineteen); ``.unpack()`` it.
    """

    def __init__(
        self,
        cutoff: float = 6.0,
        three_body_cutoff: float = 4.5,
        dataset_ids: dict[str, int] | None = None,
        dtype: torch.dtype = torch.float32,
        on_device: bool = False,
        packed: bool = False,
    ):
        self.cutoff, self.three_body_cutoff = float(cutoff), float(three_body_cutoff)
        self.dataset_ids, self.dtype, self.on_device, self.packed = dataset_ids, dtype, on_device, packed

    def __call__(self, items: Sequence) -> GraphBatch | PackedGraphBatch:
        batch = self.batch(items)
        return pack(batch) if self.packed else batch

    def batch(self, items: Sequence[Frame]) -> GraphBatch:
        """The batch of ``items``: frames here; a subclass collates items that carry more (property targets)."""
        return collate(
            items,
            dataset_ids=self.dataset_ids,
            cutoff=self.cutoff,
            three_body_cutoff=self.three_body_cutoff,
            dtype=self.dtype,
            with_graph=not self.on_device,
        )

    def finish(self, batch: GraphBatch, device: torch.device | str, non_blocking: bool = False) -> GraphBatch:
        """Move a collated batch to ``device`` and build its graph there when ``on_device``."""
        batch = batch.to(device, non_blocking=non_blocking)
        if self.on_device:
            from .device import attach_graph

            batch = attach_graph(batch, self.cutoff, self.three_body_cutoff)
        return batch

