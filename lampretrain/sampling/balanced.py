"""Distributed batch sampler that gives every rank a micro-batch of near-equal cost each step.

Every rank plans from (seed, epoch, world size) alone, with no communication, and
produces only its own micro-batches; memory per rank is the per-frame cost column
plus its own share of the epoch, never the whole epoch's plan. One epoch:

1. **Order.** Position i of the epoch holds the frame a keyed bijection of i names
   (:class:`_Permutation`, cycle-walked multiply/xor-shift rounds), so any range of
   positions is computed without materialising the order. With dataset weights a
   position maps to a slot of a dataset, and dataset k's m_k slots are whole keyed
   permutations of its frames repeated, the last one cut short (the semantics of
   :func:`~lampretrain.sampling.mixing.epoch_counts`: no frame repeats before its
   dataset was seen whole).
2. **Shares.** Costs are quantised to integers (2^24 units per budget, rounded up, so
   integer sums within the budget keep real sums within it and every rank computes
   bit-identical totals). Rank r's share is the run of positions whose cumulative-cost
   midpoint lies in [r·C/R, (r+1)·C/R): all shares cost the same to within one
   structure.
3. **Step count.** One vectorised pass over the epoch (in chunks of 2^20 positions)
   counts, per share, the structures and their cost in size classes (ratio ≤ 1.25).
   From these, :func:`_bins_needed` gives the number of micro-batches that provably
   holds the share within the budget by step 4's packing; the epoch has S = the
   maximum over shares steps on every rank.
4. **Packing.** The rank packs its share into exactly S micro-batches: its S' largest
   structures one per batch, then the rest class by class (largest class first) by
   water-filling: the class's structures, laid end to end, are cut at the batches'
   deficits to the common level, so each batch ends within one structure of that
   level. The batches end within the smallest structures' size of each other.
5. **Steps.** Batches are sorted by cost on every rank, and step s takes the rank's
   π(s)-th costliest batch, π a permutation of the steps shared by all ranks: every
   step pairs batches of the same cost rank, and costly steps are spread over the
   epoch rather than put first.

A structure costing more than the budget is never dropped: it gets a micro-batch of
its own (with a warning naming it, or an error with ``oversize="raise"``). When a
share has fewer structures than steps (an epoch with fewer structures than ranks),
its empty batches get the epoch's cheapest structure (``EpochPlan.padded`` counts them).
Resuming mid-epoch replans the rank's share from (seed, epoch, world size) and skips
to the position: the same batches as an uninterrupted run, at the cost of one plan.

The order differs from the earlier planner's (which planned all ranks from one
materialised permutation in a heap loop): a checkpoint written by it resumes at the
right step of this order, not at the same frames. Costs per epoch are limited to 2^28
budgets (float64 sums of the integer costs stay exact below 2^53).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .mixing import epoch_counts, mix_table

CHUNK = 1 << 20  # epoch positions per vectorised step of the pass: ~100 MB of temporaries
UNIT = 1 << 24  # integer cost units per budget
_ROWS = 4096  # shares whose class counts one pass step tabulates at once: at most 6.4 MB
# Size classes of integer costs 1..UNIT: the float64 bit pattern of w, shifted right by 50, keeps its
# exponent and the top two mantissa bits, so class c = key(UNIT) - key(w) holds [2^e·(1 + j/4), 2^e·(1 + (j+1)/4))
# (ratio ≤ 1.25 within a class): exact integer arithmetic, the same on every rank and machine.
_KEY_SHIFT = np.int64(50)
_TOP_KEY = np.array([float(UNIT)]).view(np.int64)[0] >> _KEY_SHIFT
N_CLASSES = 97
# the largest integer each class can hold (its upper edge rounded up, minus one), and the room that leaves in a batch
_CLASS_MAX = np.ceil(((_TOP_KEY - np.arange(N_CLASSES) + 1) << _KEY_SHIFT).view(np.float64)).astype(np.int64) - 1
_CLASS_MAX[0] = UNIT
_ROOM = UNIT - _CLASS_MAX


class OversizeWarning(UserWarning):
    """A structure costs more than the per-rank budget; it was batched alone."""


def size_class(w: np.ndarray) -> np.ndarray:
    """Size class (0 = the largest) of integer costs 1..UNIT (float64 or int64); larger costs get classes ≤ 0."""
    return _TOP_KEY - (w.astype(np.float64, copy=False).view(np.int64) >> _KEY_SHIFT)


def _bins_needed(counts: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Batches that hold each share's structures within the budget under :func:`_pack`, (rows,).

    ``counts``/``sums``: (rows, N_CLASSES) structures and integer cost per class. Once the
    S' largest are placed one per batch, water-filling class c to the level L ≤ P_c/S'
    (P_c: cost of every structure of class ≤ c) leaves each batch it fills at most
    L + _CLASS_MAX[c]. So S' fits if, for each class with structures beyond the first S',
    S'·_ROOM[c] ≥ P_c: S' ≥ min(N_c, ⌈P_c/_ROOM[c]⌉).
    """
    n = np.cumsum(counts, axis=1)
    p = np.cumsum(sums, axis=1)
    by_cost = -(-p // np.maximum(_ROOM, 1))
    need = np.where(_ROOM > 0, np.minimum(n, by_cost), n)
    return need.max(axis=1) if need.size else np.zeros(counts.shape[0], dtype=np.int64)


class _Permutation:
    """A keyed bijection of [0, n) evaluated on any array of positions (never materialised).

    Four rounds of (add key, multiply by an odd key, xor the high half into the low half) on
    the smallest power-of-two domain holding n are a bijection there; positions it sends past
    n are mapped again until they land inside (cycle walking), which keeps it a bijection of
    [0, n). ``keys`` may carry one key set per position (shape (4, 2, k)): the copies of an
    oversampled dataset are different permutations.
    """

    ROUNDS = 4

    def __init__(self, n: int):
        self.n = int(n)
        bits = max(1, (self.n - 1).bit_length())
        self.mask = np.uint64((1 << bits) - 1)
        self.shift = np.uint64(max(1, (bits + 1) // 2))

    def _round_trip(self, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
        for add, mul in keys:
            x += add  # no mask before the multiply: (x·m) mod 2^b only depends on x mod 2^b
            x *= mul | np.uint64(1)
            x &= self.mask
            x ^= x >> self.shift
        return x

    def __call__(self, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """The images of ``x`` (overwritten when it is uint64 already), as int64."""
        with np.errstate(over="ignore"):
            y = self._round_trip(x.astype(np.uint64, copy=False), keys)
            out = np.flatnonzero(y >= self.n)
            while out.size:
                k = keys if keys.ndim == 2 else keys[:, :, out]
                z = self._round_trip(y[out], k)
                y[out] = z
                out = out[z >= self.n]
        return y.view(np.int64)


def _keys(seed: int, epoch: int, stream: int) -> np.ndarray:
    """(ROUNDS, 2) uint64 keys of one permutation, from (seed, epoch, stream) alone."""
    rng = np.random.default_rng([seed, epoch, stream])
    return rng.integers(0, 2**64 - 1, size=(_Permutation.ROUNDS, 2), dtype=np.uint64, endpoint=True)


def _mix(x: np.ndarray) -> np.ndarray:
    """A fixed scrambling of uint64 values (odd multiplies and xor-shifts): per-copy keys from a base key."""
    with np.errstate(over="ignore"):
        x = x * np.uint64(0x9E3779B97F4A7C15)
        x ^= x >> np.uint64(31)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(29)
    return x


class _EpochOrder:
    """The frame at each position of one epoch, for any range of positions."""

    def __init__(self, sampler: "BalancedBatchSampler", epoch: int):
        self.s, self.epoch = sampler, epoch
        weighted = sampler.weights is not None or sampler.epoch_size is not None
        if weighted and not sampler.shuffle:
            raise ValueError("dataset weights or an epoch size need shuffle=True")
        self.counts = None
        if weighted:
            weights = sampler.weights if sampler.weights is not None else sampler.sizes / sampler.sizes.sum()
            self.counts = epoch_counts(sampler.sizes, weights, sampler.epoch_size)
            self.slot_start = np.concatenate([[0], np.cumsum(self.counts)])
        self.size = int(self.counts.sum()) if weighted else sampler.cost.size
        self.slots = _Permutation(self.size) if sampler.shuffle else None
        self.slot_keys = _keys(sampler.seed, epoch, 0)

    def frames(self, start: int, stop: int) -> np.ndarray:
        positions = np.arange(start, stop, dtype=np.uint64)
        slot = positions.astype(np.int64) if self.slots is None else self.slots(positions, self.slot_keys)
        if self.counts is None:
            return slot
        k = np.searchsorted(self.slot_start, slot, side="right") - 1
        out = np.empty(slot.size, dtype=np.int64)
        for d in np.unique(k):
            at = np.flatnonzero(k == d)
            out[at] = self.dataset_frames(int(d), slot[at] - self.slot_start[d])
        return out

    def dataset_frames(self, d: int, t: np.ndarray) -> np.ndarray:
        """Frames at dataset ``d``'s slots ``t``: copy t // n, position t % n of that copy's own permutation."""
        n = int(self.s.sizes[d])
        copy, local = np.divmod(t, n)
        first = int(copy.min())
        base = _keys(self.s.seed, self.epoch, 1 + d)
        per_copy = _mix(base[:, :, None] + np.arange(first, int(copy.max()) + 1, dtype=np.uint64))
        local = _Permutation(n)(local, per_copy[:, :, copy - first])
        starts, offsets = self.s.runs[d]  # dataset d's frames: contiguous runs of the store order
        run = np.searchsorted(offsets, local, side="right") - 1
        return starts[run] + (local - offsets[run])

    def total_cost(self) -> int:
        """Σ integer cost over the epoch, without ordering it: the share boundaries need it before the pass."""
        per_dataset = self.s.dataset_cost()
        if self.counts is None:
            return int(per_dataset.sum())
        total = 0
        for d, m in enumerate(self.counts.tolist()):
            if m == 0:
                continue
            n = int(self.s.sizes[d])
            full, rest = divmod(m, n)
            total += full * int(per_dataset[d])
            for a in range(0, rest, CHUNK):  # the last copy is cut short: only its first ``rest`` frames count
                t = np.arange(full * n + a, full * n + min(rest, a + CHUNK), dtype=np.int64)
                total += int(self.s.quantise(self.s.cost[self.dataset_frames(d, t)])[0].sum())  # exact: see quantise
        return total


@dataclass
class _Scan:
    """What one pass over the epoch found: the step count, the kept ranks' shares, the oversize structures."""

    steps: int
    shares: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]  # rank → (frames, integer costs, oversize) by position
    oversize: int  # oversize structures in the epoch (all ranks)
    oversize_first: list[int]  # the first ones by position (the warning names them)
    oversize_lowest: int  # the lowest frame index among them (the error names it: independent of the order)
    cheapest: int  # frame of the epoch's cheapest structure (what empty batches get)


def _deficits(load: np.ndarray, volume: int) -> np.ndarray:
    """Integer amounts summing to ``volume`` that raise the least-loaded batches to one common level."""
    o = np.argsort(load, kind="stable")
    low = load[o]
    prefix = np.concatenate([[0], np.cumsum(low)])
    # need[k-1]: what raising the k least-loaded batches to the k-th one's load takes (non-decreasing in k)
    need = np.arange(1, load.size + 1) * low - prefix[1:]
    k = int(np.searchsorted(need, volume, side="right"))
    level, extra = divmod(volume + int(prefix[k]), k)
    deficit = np.zeros(load.size, dtype=np.int64)
    deficit[o[:k]] = level - load[o[:k]]
    deficit[o[:extra]] += 1
    return deficit


def _pack(w: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Batch (0..bins-1) of each structure of integer cost ``w`` (each ≤ UNIT), and each batch's load.

    Largest first, one per batch; then each size class, largest first, laid end to end and cut
    at the water-filling deficits (a structure goes to the batch its start falls in), so the
    batches it fills end within one of its structures of a common level (:func:`_bins_needed`
    is the bound that keeps that level within the budget).
    """
    load = np.zeros(bins, dtype=np.int64)
    batch = np.empty(w.size, dtype=np.int64)
    order = np.argsort(-w, kind="stable")
    ordered = w[order]
    head = min(bins, w.size)
    batch[order[:head]] = np.arange(head)
    load[:head] = ordered[:head]
    rest = ordered[head:]
    if rest.size:
        cls = size_class(rest)  # non-decreasing: ``rest`` is sorted by decreasing cost
        cuts = np.concatenate([[0], np.flatnonzero(np.diff(cls)) + 1, [rest.size]])
        for a, b in zip(cuts[:-1], cuts[1:]):
            seg = rest[a:b]
            bounds = np.cumsum(_deficits(load, int(seg.sum())))
            to = np.searchsorted(bounds, np.cumsum(seg) - seg, side="right")
            batch[order[head + a : head + b]] = to
            load += np.bincount(to, weights=seg, minlength=bins).astype(np.int64)
    if load.size and load.max() > UNIT:
        raise RuntimeError(f"balanced sampler: a batch holds {load.max() / UNIT:.6f} budgets; the step bound failed")
    return batch, load


@dataclass
class EpochPlan:
    """The micro-batches of one epoch for ``ranks``: step s, rank r holds ``items[offsets[b] : offsets[b + 1]]``,
    b = s·len(ranks) + (r − ranks.start). A sampler's own plan has its rank only."""

    items: np.ndarray  # frame indices
    offsets: np.ndarray  # (S·len(ranks) + 1,) int64
    loads: np.ndarray  # (S, len(ranks)) float64 cost per micro-batch
    world_size: int
    ranks: range
    padded: int  # repeats of the epoch's cheapest structure in batches that would be empty, over ``ranks``
    oversize: np.ndarray  # frames of ``ranks`` that got a micro-batch of their own
    window_steps: int = 0  # steps per window (a window's batches hold only its frames); the whole epoch when 1 window
    # per (rank, window), rank-major, the window's frames in epoch-position order (the order a stream reads them);
    # kept by samplers whose frames are streamed (StreamBatchSampler), else None
    streams: list[np.ndarray] | None = None

    @property
    def steps(self) -> int:
        return int(self.loads.shape[0])

    @property
    def windows(self) -> int:
        return self.steps // self.window_steps if self.window_steps else 1

    def stream(self, window: int, rank: int) -> np.ndarray:
        """Frames of ``rank``'s ``window`` in the order a stream reads them (a plan that kept its streams)."""
        if self.streams is None:
            raise ValueError("this plan did not keep its streams (plan of a StreamBatchSampler)")
        if rank not in self.ranks:
            raise ValueError(f"rank {rank} is not in this plan (ranks {self.ranks.start}..{self.ranks.stop - 1})")
        return self.streams[(rank - self.ranks.start) * self.windows + window]

    def batch(self, step: int, rank: int) -> np.ndarray:
        if rank not in self.ranks:
            raise ValueError(f"rank {rank} is not in this plan (ranks {self.ranks.start}..{self.ranks.stop - 1})")
        b = step * len(self.ranks) + rank - self.ranks.start
        return self.items[self.offsets[b] : self.offsets[b + 1]]

    def max_over_mean(self) -> np.ndarray:
        """Per-step imbalance over the plan's ranks: slowest rank's cost over the mean rank cost, (S,)."""
        return self.loads.max(axis=1) / np.maximum(self.loads.mean(axis=1), 1e-300)


class BalancedBatchSampler:
    """Cost-budgeted, rank-balanced, resumable batch sampler (use as ``DataLoader(batch_sampler=...)``).

    ``cost`` is the per-frame cost (see :class:`~lampretrain.sampling.cost.CostModel`), held as
    float32; ``dataset``/``weights`` the per-frame dataset id and per-dataset sampling
    probabilities (default: every frame once per epoch). The batches depend only on (seed,
    epoch, world size); planning one rank's epoch is one pass over the epoch plus packing its
    share (module docstring). ``state_dict()`` records (epoch, position); a sampler loading it
    yields exactly the steps the saved one had left.
    """

    def __init__(
        self,
        cost: np.ndarray,
        budget: float,
        rank: int = 0,
        world_size: int = 1,
        dataset: np.ndarray | None = None,
        weights: np.ndarray | None = None,
        epoch_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        oversize: str = "warn",
        ids: Sequence[str] | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if oversize not in ("warn", "raise"):
            raise ValueError(f"oversize must be 'warn' or 'raise', got '{oversize}'")
        if not budget > 0:
            raise ValueError(f"cost budget must be > 0, got {budget}")
        # float32: 4 bytes per frame is most of what a rank holds; its 6e-8 rounding is far below the cost model's error
        self.cost = np.asarray(cost, dtype=np.float32)
        if self.cost.ndim != 1 or not np.isfinite(self.cost).all() or (self.cost < 0).any():
            raise ValueError("per-frame cost must be a 1-D array of finite values >= 0")
        self.dataset = None
        self.sizes = np.array([self.cost.size], dtype=np.int64)
        if dataset is not None:
            dataset = np.asarray(dataset)
            if dataset.shape != self.cost.shape:
                raise ValueError(f"dataset ids shape {dataset.shape} differs from cost shape {self.cost.shape}")
            k = int(dataset.max()) + 1 if dataset.size else 1
            self.dataset = dataset.astype(np.min_scalar_type(k - 1))  # one byte per frame for up to 256 datasets
            self.sizes = np.bincount(self.dataset, minlength=k).astype(np.int64)
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        if self.weights is not None and self.weights.size < self.sizes.size:
            raise ValueError(f"{self.weights.size} dataset weights for {self.sizes.size} datasets")
        if self.weights is not None and self.weights.size > self.sizes.size:
            self.sizes = np.concatenate([self.sizes, np.zeros(self.weights.size - self.sizes.size, dtype=np.int64)])
        self.budget = float(budget)
        self.scale = UNIT / self.budget
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch_size, self.seed, self.shuffle = epoch_size, int(seed), shuffle
        self.oversize, self.ids = oversize, ids
        self.runs = self._runs() if (weights is not None or epoch_size is not None) else None
        self.epoch, self.position = 0, 0
        self._plan: tuple[int, EpochPlan] | None = None
        self._dataset_cost: np.ndarray | None = None
        self.keep_streams = False  # plans keep each window's frames in stream order (EpochPlan.streams)

    def _runs(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per dataset, where its frames lie: (first frame of each contiguous run, dataset-local index it starts at)."""
        ids = self.dataset if self.dataset is not None else np.zeros(self.cost.size, dtype=np.uint8)
        starts = np.concatenate([[0], np.flatnonzero(ids[1:] != ids[:-1]) + 1]) if ids.size else np.zeros(0, np.int64)
        lengths = np.diff(np.append(starts, ids.size))
        of = ids[starts]
        runs = []
        for d in range(self.sizes.size):
            mine = of == d
            runs.append((starts[mine], np.concatenate([[0], np.cumsum(lengths[mine])[:-1]]).astype(np.int64)))
        return runs

    def quantise(self, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(integer cost ≥ 1 as float64, rounded up; oversize mask) of ``cost``: UNIT per budget, within-budget
        ones ≤ UNIT. Float64 holds these integers exactly (sums too, below 2^53) and is what bincount weighs with."""
        w = cost.astype(np.float64)
        w *= self.scale
        np.ceil(w, out=w)
        np.maximum(w, 1.0, out=w)
        over = cost > self.budget
        if w.size and w.max() > UNIT:  # a cost at the budget can round to UNIT + 1
            np.minimum(w, UNIT, out=w, where=~over)
        return w, over

    def dataset_cost(self) -> np.ndarray:
        """Integer cost of all frames of each dataset (computed once: the cost column does not change)."""
        if self._dataset_cost is None:
            total = np.zeros(self.sizes.size, dtype=np.int64)
            for a in range(0, self.cost.size, CHUNK):
                w = self.quantise(self.cost[a : a + CHUNK])[0]  # integer-valued: the sums below are exact
                if self.dataset is None:
                    total[0] += int(w.sum())
                else:  # float64 bincount sums of integers are exact below 2^53
                    total += np.bincount(self.dataset[a : a + CHUNK], weights=w, minlength=total.size).astype(np.int64)
            self._dataset_cost = total
        return self._dataset_cost

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's frame indices in position order, before packing (materialised: for inspection and tests)."""
        order = self._order(epoch)
        return np.concatenate([order.frames(a, min(order.size, a + CHUNK)) for a in range(0, order.size, CHUNK)]
                              or [np.zeros(0, dtype=np.int64)])

    def _scan(self, order: _EpochOrder, ranks: range, shares: int | None = None) -> _Scan:
        """One pass over the epoch in position order: share of every position, the per-share bound, kept shares.

        ``shares``: how many cost-equal shares the epoch is cut into (default: one per rank; a windowed
        plan cuts one per (rank, window)); ``ranks`` are the shares to keep."""
        R = self.world_size if shares is None else shares
        total = order.total_cost()
        if 2 * total >= 1 << 53:
            raise ValueError(f"an epoch of {total / UNIT:.3g} budgets of cost is more than this sampler plans (2^28)")
        # share r = positions whose cost midpoint m (2·start + w, in half units) has r·2C/R ≤ m < (r+1)·2C/R;
        # ceil(r·2C/R) = r·q + ceil(r·rem/R) stays in int64 for any world size
        q, rem = divmod(2 * total, R)

        def cut(r: np.ndarray) -> np.ndarray:
            return r * q + (r * rem + R - 1) // R

        offset, steps = 0, 0
        carry = None  # (share, class table row) of the share the previous chunk ended in
        kept: list[tuple[np.ndarray, ...]] = []
        n_over, over_first, over_low = 0, [], -1
        cheapest, cheapest_cost = -1, np.inf
        width = N_CLASSES + 1  # the extra column counts oversize structures

        def close(rows: np.ndarray) -> int:
            return int((_bins_needed(rows[:, :N_CLASSES], rows[:, width:-1]) + rows[:, N_CLASSES]).max())

        for a in range(0, order.size, CHUNK):
            frames = order.frames(a, min(order.size, a + CHUNK))
            c = self.cost[frames]
            wf, over = self.quantise(c)
            w = wf.astype(np.int64)
            mid = np.cumsum(w)
            chunk_cost = int(mid[-1])
            mid *= 2
            mid -= w
            mid += 2 * offset
            offset += chunk_cost
            lo, hi = int(mid[0]) * R // (2 * total), int(mid[-1]) * R // (2 * total)
            starts = np.searchsorted(mid, cut(np.arange(lo + 1, hi + 1, dtype=np.int64)))
            bound = np.concatenate([[0], starts, [mid.size]])  # share lo + i holds items bound[i]:bound[i + 1]
            local = np.bincount(starts, minlength=mid.size + 1)[:-1]
            np.cumsum(local, out=local)  # share of each item, minus lo
            k0, k1 = (bound[min(max(r - lo, 0), bound.size - 1)] for r in (ranks.start, ranks.stop))
            if k1 > k0:
                kept.append((local[k0:k1] + lo, frames[k0:k1], w[k0:k1], over[k0:k1]))
            cls = size_class(wf)
            if over.any():
                big = frames[over]
                n_over += big.size
                over_first += big[: max(0, 10 - len(over_first))].tolist()
                over_low = int(big.min()) if over_low < 0 else min(over_low, int(big.min()))
                cls[over] = N_CLASSES
            i = int(np.argmin(c))
            if c[i] < cheapest_cost:
                cheapest, cheapest_cost = int(frames[i]), c[i]
            for base in range(lo, hi + 1, _ROWS):  # at most _ROWS shares tabulated at once
                rows = min(_ROWS, hi + 1 - base)
                j0, j1 = bound[base - lo], bound[base - lo + rows]
                idx = (local[j0:j1] - (base - lo)) * width + cls[j0:j1]
                table = np.concatenate([  # per share: counts per class, oversize count, integer cost per class
                    np.bincount(idx, minlength=rows * width).reshape(rows, width),
                    np.bincount(idx, weights=wf[j0:j1], minlength=rows * width).astype(np.int64).reshape(rows, width),
                ], axis=1)
                if carry is not None:
                    if carry[0] == base:
                        table[0] += carry[1]
                    else:
                        steps = max(steps, close(carry[1][None]))
                    carry = None
                done = rows if base + rows - 1 < hi else rows - 1  # the chunk's last share may go on in the next
                if done:
                    steps = max(steps, close(table[:done]))
                if done < rows:
                    carry = (hi, table[-1])
        if carry is not None:
            steps = max(steps, close(carry[1][None]))
        if offset != total:
            raise RuntimeError(f"balanced sampler: the pass summed cost {offset}, the epoch total is {total}")
        shares = {}
        if kept:
            share, frames, w, over = (np.concatenate(x) for x in zip(*kept))
            bounds = np.searchsorted(share, np.arange(ranks.start, ranks.stop + 1))
            for r, (s0, s1) in zip(ranks, zip(bounds[:-1], bounds[1:])):
                shares[r] = (frames[s0:s1], w[s0:s1], over[s0:s1])
        return _Scan(steps, shares, n_over, over_first, over_low, cheapest)

    def _name(self, frame: int) -> str:
        return self.ids[frame] if self.ids is not None else str(frame)

    def _rank_batches(self, scan: _Scan, rank: int, step_perm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(frames, step of each) of one rank's S micro-batches."""
        S = scan.steps
        empty = np.zeros(0, dtype=np.int64)
        frames, w, over = scan.shares.get(rank, (empty, empty, np.zeros(0, dtype=bool)))
        alone = frames[over]
        normal = S - alone.size
        batch, load = _pack(w[~over], normal)
        unused = np.flatnonzero(load == 0) if normal else empty  # a share with fewer structures than batches
        pad_w = int(self.quantise(self.cost[[scan.cheapest]])[0][0]) if unused.size else 0
        load[unused] = pad_w
        loads = np.concatenate([load, w[over]])
        by_cost = np.argsort(-loads, kind="stable")
        step_of = np.empty(S, dtype=np.int64)
        step_of[by_cost[step_perm]] = np.arange(S)
        items = np.concatenate([frames[~over], alone, np.full(unused.size, scan.cheapest, dtype=np.int64)])
        steps = step_of[np.concatenate([batch, normal + np.arange(alone.size), unused])]
        o = np.argsort(steps, kind="stable")
        return items[o], steps[o]

    def _order(self, epoch: int) -> _EpochOrder:
        """The frame at each position of ``epoch`` (a streaming sampler orders positions by shard)."""
        return _EpochOrder(self, epoch)

    def _windows(self, order: _EpochOrder) -> int:
        """Windows per rank share: 1, the share is packed as a whole (a streaming sampler cuts it to its buffer)."""
        return 1

    def _build(self, epoch: int, ranks: range) -> EpochPlan:
        order = self._order(epoch)
        K = self._windows(order)  # every rank's share is cut into K cost-equal windows: share (r, j) = r·K + j
        scan = self._scan(order, range(ranks.start * K, ranks.stop * K), self.world_size * K)
        if scan.oversize and self.oversize == "raise":
            c = float(self.cost[scan.oversize_lowest])
            raise ValueError(
                f"structure {self._name(scan.oversize_lowest)} costs {c:.4g} > budget {self.budget:.4g} "
                f"({scan.oversize} such structures); raise the budget or use oversize='warn'"
            )
        if scan.oversize:
            names = [self._name(x) for x in scan.oversize_first]
            more = f" and {scan.oversize - len(names)} more" if scan.oversize > len(names) else ""
            warnings.warn(
                f"{scan.oversize} structure(s) cost more than the budget {self.budget:.4g} and were batched alone: "
                f"{', '.join(names)}{more}",
                OversizeWarning,
                stacklevel=4,
            )
        W, n = scan.steps, len(ranks)  # W steps per window, the same for every window and rank
        S = K * W
        # per window, one permutation of its steps shared by every rank: a step pairs the ranks' π(s)-th costliest
        # batches of that window (a window's steps are consecutive: a stream holds one window's frames at a time)
        perms = [np.random.default_rng([self.seed, epoch, 1 << 40, *([j] if j else [])]).permutation(W)
                 if self.shuffle else np.arange(W) for j in range(K)]
        items, keys, loads, padded, alone = [], [], np.zeros((S, n)), 0, []
        streams = [] if self.keep_streams else None
        for col, r in enumerate(ranks):
            for j in range(K):
                frames, steps = self._rank_batches(scan, r * K + j, perms[j])
                steps += j * W
                items.append(frames)
                keys.append(steps * n + col)
                loads[:, col] += np.bincount(steps, weights=self.cost[frames], minlength=S)
                share = scan.shares.get(r * K + j)
                real = 0 if share is None else share[0].size
                padded += frames.size - real
                if share is not None:
                    alone.append(share[0][share[2]])
                if streams is not None:  # the window's frames in position order, then the padding frame if any
                    mine = share[0] if share is not None else np.zeros(0, dtype=np.int64)
                    streams.append(np.append(mine, [scan.cheapest]) if frames.size > real else mine)
        if n == 1 and K == 1:
            flat, key = items[0], keys[0]  # already in step order
        else:
            key = np.concatenate(keys)
            o = np.argsort(key, kind="stable")
            flat, key = np.concatenate(items)[o], key[o]
        offsets = np.concatenate([[0], np.cumsum(np.bincount(key, minlength=S * n))]).astype(np.int64)
        oversize = np.concatenate(alone) if alone else np.zeros(0, dtype=np.int64)
        return EpochPlan(flat, offsets, loads, self.world_size, ranks, padded, oversize, W, streams)

    def plan(self, epoch: int | None = None, ranks: range | None = None) -> EpochPlan:
        """This rank's plan of ``epoch`` (cached), or that of ``ranks`` (simulations and checks: not cached)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if ranks is not None:
            return self._build(epoch, ranks)
        if self._plan is None or self._plan[0] != epoch:
            self._plan = None  # the previous epoch's plan goes before the next one is built
            self._plan = (epoch, self._build(epoch, range(self.rank, self.rank + 1)))
        return self._plan[1]

    def mix(self, epoch: int | None = None, natoms: np.ndarray | None = None, names: Sequence[str] | None = None):
        """The effective per-dataset share of frames (and atoms) this epoch, next to the target weights."""
        order = self._order(self.epoch if epoch is None else int(epoch))
        k = self.sizes.size
        frames, atoms = np.zeros(k), np.zeros(k)
        for a in range(0, order.size, CHUNK):
            f = order.frames(a, min(order.size, a + CHUNK))
            d = self.dataset[f] if self.dataset is not None else np.zeros(f.size, dtype=np.int64)
            frames += np.bincount(d, minlength=k)
            if natoms is not None:
                atoms += np.bincount(d, weights=np.asarray(natoms, dtype=np.float64)[f], minlength=k)
        return mix_table(frames, atoms if natoms is not None else None, names, self.weights)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0

    def __len__(self) -> int:
        return self.plan().steps

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.plan()
        while self.position < plan.steps:
            step = self.position
            self.position += 1
            yield plan.batch(step, self.rank).tolist()
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self, position: int | None = None) -> dict:
        """(epoch, position) plus what must match on resume; pass the trainer's step in the epoch as
        ``position`` when a DataLoader prefetches batches ahead of training."""
        return {
            "epoch": self.epoch,
            "position": self.position if position is None else int(position),
            "seed": self.seed,
            "world_size": self.world_size,
            "n_frames": int(self.cost.size),
        }

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("world_size", self.world_size), ("n_frames", int(self.cost.size)), ("seed", self.seed)):
            if key in state and state[key] != mine:
                raise ValueError(f"sampler state has {key}={state[key]} but this run has {mine}: the order would differ")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
