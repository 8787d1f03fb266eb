"""The cost-balanced sampler for frames that are streamed from shards instead of read at random.

:class:`StreamBatchSampler` is :class:`~lampretrain.sampling.balanced.BalancedBatchSampler` with two changes,
everything else (shares, step count, packing, step pairing, resume) being the same code:

1. **Order by shard.** A *segment* is a run of frames of one shard and one dataset (the store writes a
   dataset's frames contiguously, so most shards are one segment). An epoch is a sequence of segment
   instances, each read front to back: with dataset weights, dataset k's m_k frames are whole copies of
   its segments, each copy in its own keyed order, the last copy cut short (as
   :func:`~lampretrain.sampling.mixing.epoch_counts` says, no frame repeats before its dataset was seen
   whole); all instances are then shuffled together by (seed, epoch). Rank r's share (a cost-equal run of
   positions, as in the balanced sampler) is therefore a run of whole segments with at most a partial one
   at each end: a rank streams its own shards, and a shard cut between two ranks is read by both, each
   keeping its own records.
2. **Windows.** Each rank's share is cut into K cost-equal windows, K = ⌈epoch frames / (ranks · buffer)⌉,
   the same on every rank, so a window holds ``buffer`` frames on average. A window's frames are packed
   into W micro-batches by the balanced packing (W = the most any window of any rank needs, so every rank
   has the same K·W steps), and its steps are consecutive, in a permutation shared by the ranks: a reader
   holds one window of frames at a time (the bounded shuffle buffer: frames of a window are mixed across
   its micro-batches, and its micro-batches come in a shuffled order), and at every step the ranks' batches
   have the same cost rank within the same window.

The end of an epoch needs no special case: every rank has exactly K·W steps by construction (a window with
fewer structures than W gets copies of the epoch's cheapest structure). Resuming at step s replans the
epoch and restarts the stream at window s // W, skipping s mod W of its micro-batches: the same remaining
batches as an uninterrupted run.
"""

from __future__ import annotations

import numpy as np

from .balanced import CHUNK, BalancedBatchSampler
from .mixing import epoch_counts


class _StreamOrder:
    """Epoch positions laid out as shuffled segment instances, each read front to back (module docstring)."""

    def __init__(self, sampler: "StreamBatchSampler", epoch: int):
        s = sampler
        self.s = s
        seed, shuffle = s.seed, s.shuffle
        weighted = s.weights is not None or s.epoch_size is not None
        if weighted and not shuffle:
            raise ValueError("dataset weights or an epoch size need shuffle=True")
        if not weighted:
            seg = np.arange(s.seg_start.size, dtype=np.int64)
            length = s.seg_len.copy()
        else:
            weights = s.weights if s.weights is not None else s.sizes / s.sizes.sum()
            counts = epoch_counts(s.sizes, weights, s.epoch_size)
            segs, lens = [], []
            for d, m in enumerate(counts.tolist()):
                if m == 0:
                    continue
                mine = np.flatnonzero(s.seg_ds == d)
                full, rest = divmod(m, int(s.sizes[d]))
                copies = full + (rest > 0)
                keys = np.random.default_rng([seed, epoch, 1 + d]).random((copies, mine.size))
                order = mine[np.argsort(keys, axis=1, kind="stable")].reshape(-1)  # each copy in its own order
                length = s.seg_len[order].copy()
                if rest:  # the last copy stops after ``rest`` frames, in the middle of a segment if it must
                    last = slice(full * mine.size, None)
                    cum = np.cumsum(length[last])
                    k = int(np.searchsorted(cum, rest))
                    length[last][k] -= int(cum[k]) - rest
                    keep = full * mine.size + k + 1
                    order, length = order[:keep], length[:keep]
                segs.append(order)
                lens.append(length)
            seg, length = np.concatenate(segs), np.concatenate(lens)
        if shuffle:
            o = np.random.default_rng([seed, epoch, 0]).permutation(seg.size)
            seg, length = seg[o], length[o]
        self.seg, self.length = seg, length
        self.offsets = np.concatenate([[0], np.cumsum(length)]).astype(np.int64)
        self.size = int(self.offsets[-1])

    def frames(self, start: int, stop: int) -> np.ndarray:
        p = np.arange(start, stop, dtype=np.int64)
        i = np.searchsorted(self.offsets, p, side="right") - 1
        return self.s.seg_start[self.seg[i]] + (p - self.offsets[i])

    def total_cost(self) -> int:
        s = self.s
        whole = self.length == s.seg_len[self.seg]
        total = int(s.segment_cost()[self.seg[whole]].sum())
        for g, n in zip(self.seg[~whole].tolist(), self.length[~whole].tolist()):  # cut-short instances
            a = int(s.seg_start[g])
            total += int(s.quantise(s.cost[a : a + n])[0].sum())
        return total


class StreamBatchSampler(BalancedBatchSampler):
    """:class:`BalancedBatchSampler` for streamed frames: positions ordered by shard segment, each rank's share
    cut into windows of about ``buffer`` frames (module docstring). ``shard``: per frame, the shard it is in;
    frames must come in store order (shard numbers non-decreasing). Plans keep each window's frames in stream
    order (:meth:`EpochPlan.stream`): the reader reads those, then serves :meth:`EpochPlan.batch`."""

    def __init__(self, cost: np.ndarray, budget: float, rank: int = 0, world_size: int = 1, *,
                 shard: np.ndarray, buffer: int = 4096, segment: int | None = None, **options):
        super().__init__(cost, budget, rank, world_size, **options)
        shard = np.asarray(shard, dtype=np.int64)
        if shard.shape != self.cost.shape:
            raise ValueError(f"shard numbers shape {shard.shape} differs from cost shape {self.cost.shape}")
        if shard.size and (np.diff(shard) < 0).any():
            raise ValueError("frames of a streamed epoch must come in store order (shard numbers non-decreasing)")
        if buffer < 1:
            raise ValueError(f"stream buffer must be >= 1 frame, got {buffer}")
        self.buffer = int(buffer)
        ds = self.dataset if self.dataset is not None else np.zeros(self.cost.size, dtype=np.uint8)
        cut = np.flatnonzero((shard[1:] != shard[:-1]) | (ds[1:] != ds[:-1])) + 1 if shard.size else np.zeros(0, int)
        start = np.concatenate([[0], cut]).astype(np.int64) if shard.size else np.zeros(0, dtype=np.int64)
        if segment is not None:  # runs cut into pieces of at most ``segment`` frames
            if segment < 1:
                raise ValueError(f"stream segment must be >= 1 frame, got {segment}")
            length = np.diff(np.append(start, shard.size))
            pieces = -(-length // segment)
            first = np.repeat(np.cumsum(pieces) - pieces, pieces)
            start = np.repeat(start, pieces) + (np.arange(int(pieces.sum())) - first) * segment
        self.segment = segment
        self.seg_start = start
        self.seg_len = np.diff(np.append(self.seg_start, shard.size)).astype(np.int64)
        self.seg_ds = ds[self.seg_start].astype(np.int64)
        self.keep_streams = True
        self._segment_cost: np.ndarray | None = None

    def segment_cost(self) -> np.ndarray:
        """Integer cost of each segment (computed once)."""
        if self._segment_cost is None:
            total = np.zeros(self.seg_start.size, dtype=np.int64)
            for a in range(0, self.cost.size, CHUNK):
                w = self.quantise(self.cost[a : a + CHUNK])[0]
                g = np.searchsorted(self.seg_start, np.arange(a, a + w.size), side="right") - 1
                total += np.bincount(g, weights=w, minlength=total.size).astype(np.int64)
            self._segment_cost = total
        return self._segment_cost

    def _order(self, epoch: int) -> _StreamOrder:
        return _StreamOrder(self, epoch)

    def _windows(self, order: _StreamOrder) -> int:
        return max(1, -(-order.size // (self.world_size * self.buffer)))

    def state_dict(self, position: int | None = None) -> dict:
        return super().state_dict(position) | {"format": "wds", "buffer": self.buffer, "segment": self.segment}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("format", "wds"), ("buffer", self.buffer), ("segment", self.segment)):
            if key in state and state[key] != mine:
                raise ValueError(f"sampler state has {key}={state[key]} but this run has {mine}: the order would differ")
        super().load_state_dict(state)
