"""Distributed batch sampler that gives every rank a micro-batch of near-equal cost each step.

Every rank plans the same epoch from (seed, epoch, world size) alone, so no
communication is needed and every rank yields the same number of steps (DDP
would hang otherwise). One step is planned like this:

1. a pool is taken from the shuffled stream (items deferred by the previous
   step first) until its cost reaches ``world_size × budget``;
2. the pool, largest first, goes to the least-loaded rank whose load stays
   within ``budget`` (longest-processing-time with capacity); what does not
   fit is deferred to the next step;
3. further stream items top up the ranks until the least-loaded one is within
   ``fill`` of the budget or ``world_size`` items in a row did not fit.

The tail of the epoch (less than two steps' worth left) is split into
k·world_size bins by the same rule, bins sorted by cost and dealt k steps of
similar cost. A structure costing more than the budget is never dropped: it
gets a micro-batch of its own (with a warning naming it, or an error with
``oversize="raise"``); such structures are grouped world_size at a time so
oversize steps are balanced among themselves. When an epoch has fewer
structures than ranks in its last step, the cheapest structures of the epoch
are repeated to give every rank a batch (``EpochPlan.padded`` counts them).
"""

from __future__ import annotations

import heapq
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .mixing import draw_epoch, effective_mix


class OversizeWarning(UserWarning):
    """A structure costs more than the per-rank budget; it was batched alone."""


@dataclass
class EpochPlan:
    """All micro-batches of one epoch: step s, rank r holds ``items[offsets[s*R + r] : offsets[s*R + r + 1]]``."""

    items: np.ndarray  # (M,) int64 frame indices
    offsets: np.ndarray  # (S*R + 1,) int64
    loads: np.ndarray  # (S, R) float64 cost per micro-batch
    world_size: int
    padded: int  # repeated structures added so every rank has a batch in the last step
    oversize: np.ndarray  # frame indices that got a micro-batch of their own

    @property
    def steps(self) -> int:
        return int(self.loads.shape[0])

    def batch(self, step: int, rank: int) -> np.ndarray:
        b = step * self.world_size + rank
        return self.items[self.offsets[b] : self.offsets[b + 1]]

    def max_over_mean(self) -> np.ndarray:
        """Per-step imbalance: slowest rank's cost over the mean rank cost, (S,)."""
        return self.loads.max(axis=1) / np.maximum(self.loads.mean(axis=1), 1e-300)


def _lpt(
    items: np.ndarray, cost: np.ndarray, bins: list[list[int]], heap: list[tuple[float, int]], budget: float
) -> list[int]:
    """Place ``items`` (largest first) on the least-loaded open bin within ``budget``; returns what did not fit."""
    rejected = []
    for item in items[np.argsort(-cost[items], kind="stable")]:
        load, b = heap[0]
        c = cost[item]
        if load + c <= budget:
            bins[b].append(int(item))
            heapq.heapreplace(heap, (load + c, b))
        else:
            rejected.append(int(item))
    return rejected


def plan_epoch(
    order: np.ndarray,
    cost: np.ndarray,
    world_size: int,
    budget: float,
    fill: float = 0.01,
    oversize: str = "warn",
    ids: Sequence[str] | None = None,
) -> EpochPlan:
    """Cut the shuffled frame indices ``order`` into steps of ``world_size`` micro-batches within ``budget``."""
    if oversize not in ("warn", "raise"):
        raise ValueError(f"oversize must be 'warn' or 'raise', got '{oversize}'")
    if not budget > 0:
        raise ValueError(f"cost budget must be > 0, got {budget}")
    R = int(world_size)
    cost = np.asarray(cost, dtype=np.float64)
    order = np.asarray(order, dtype=np.int64)
    big = cost[order] > budget
    too_big = order[big]
    if too_big.size and oversize == "raise":
        name = ids[too_big[0]] if ids is not None else int(too_big[0])
        raise ValueError(
            f"structure {name} costs {cost[too_big[0]]:.4g} > budget {budget:.4g} "
            f"({too_big.size} such structures); raise the budget or use oversize='warn'"
        )
    stream = order[~big]
    at = np.append(np.nonzero(~big)[0], order.size)  # position in ``order`` of each stream item
    big_at = np.nonzero(big)[0][::R]  # position in ``order`` of each oversize step's first structure
    starts: list[int] = []
    csum = np.concatenate([[0.0], np.cumsum(cost[stream])])
    big_steps = [[[int(x)] for x in too_big[k : k + R]] for k in range(0, too_big.size - too_big.size % R, R)]
    steps: list[list[list[int]]] = []
    leftover_big = [int(x) for x in too_big[too_big.size - too_big.size % R :]]
    pos, deferred = 0, np.zeros(0, dtype=np.int64)
    n = stream.size
    while True:
        remaining = cost[deferred].sum() + csum[n] - csum[pos]
        if remaining < 2 * R * budget:
            break
        end = int(np.searchsorted(csum, csum[pos] + R * budget - cost[deferred].sum(), side="left"))
        end = min(max(end, pos), n)
        starts.append(int(at[pos]))
        pool = np.concatenate([deferred, stream[pos:end]])
        pos = end
        bins: list[list[int]] = [[] for _ in range(R)]
        heap = [(0.0, b) for b in range(R)]
        rejected = _lpt(pool, cost, bins, heap, budget)
        misses = 0
        while pos < n and heap[0][0] < (1.0 - fill) * budget and misses < R:
            item = int(stream[pos])
            pos += 1
            load, b = heap[0]
            if load + cost[item] <= budget:
                bins[b].append(item)
                heapq.heapreplace(heap, (load + cost[item], b))
                misses = 0
            else:
                rejected.append(item)
                misses += 1
        deferred = np.array(rejected, dtype=np.int64)
        steps.append(bins)
    steps = _interleave(steps, starts, big_steps, big_at[: len(big_steps)])
    tail = np.concatenate([deferred, stream[pos:]])
    padded = 0
    if tail.size or leftover_big:
        tail_steps, padded = _plan_tail(tail, leftover_big, cost, R, budget, order)
        steps.extend(tail_steps)
    if too_big.size and oversize == "warn":
        names = [ids[x] if ids is not None else str(int(x)) for x in too_big[:10]]
        more = f" and {too_big.size - 10} more" if too_big.size > 10 else ""
        warnings.warn(
            f"{too_big.size} structure(s) cost more than the budget {budget:.4g} and were batched alone: "
            f"{', '.join(names)}{more}",
            OversizeWarning,
            stacklevel=3,
        )
    return _pack(steps, cost, R, padded, too_big)


def _interleave(
    packed: list[list[list[int]]], starts: Sequence[int], big: list[list[list[int]]], big_starts: Sequence[int]
) -> list[list[list[int]]]:
    """Oversize steps merged into the packed ones where their structures fall in the shuffled order.

    Putting them all first would give a short run nothing but the oversize structures
    (often one or two datasets) and the rest of the epoch only after them. Positions are
    those in the epoch's order (``starts``: where each packed step began taking new
    structures), not looked up by structure index: an oversampled dataset repeats
    structures within an epoch, and a repeat's later position would hold back every
    oversize step behind it.
    """
    merged, k = [], 0
    for step, start in zip(packed, starts):
        while k < len(big) and big_starts[k] < start:
            merged.append(big[k])
            k += 1
        merged.append(step)
    return merged + big[k:]


def _plan_tail(
    tail: np.ndarray, big: list[int], cost: np.ndarray, R: int, budget: float, order: np.ndarray
) -> tuple[list[list[list[int]]], int]:
    """Last steps: the rest split into k·R bins within budget (k as small as fits), dealt by cost into k steps."""
    total = cost[tail].sum() + cost[big].sum() if big else cost[tail].sum()
    k = max(1, int(np.ceil(total / (R * budget))))
    while True:
        n_bins = k * R
        bins: list[list[int]] = [[x] for x in big] + [[] for _ in range(n_bins - len(big))]
        heap = [(0.0, b) for b in range(len(big), n_bins)]
        heapq.heapify(heap)
        if not _lpt(tail, cost, bins, heap, budget):  # always true once there are as many bins as items
            break
        k += 1
    empty = [b for b in bins if not b]
    padded = len(empty)
    if padded:  # fewer structures than ranks: repeat the epoch's cheapest ones
        cheapest = order[np.argsort(cost[order], kind="stable")]
        for b, item in zip(empty, np.resize(cheapest, padded)):
            b.append(int(item))
    load = np.array([cost[b].sum() for b in bins])
    ranked = [bins[i] for i in np.argsort(-load, kind="stable")]
    return [ranked[s * R : (s + 1) * R] for s in range(k)], padded


def _pack(steps: list[list[list[int]]], cost: np.ndarray, R: int, padded: int, oversize: np.ndarray) -> EpochPlan:
    flat = [b for step in steps for b in step]
    sizes = np.array([len(b) for b in flat], dtype=np.int64)
    items = np.array([x for b in flat for x in b], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    loads = np.add.reduceat(cost[items], offsets[:-1]) if items.size else np.zeros(0)
    return EpochPlan(items, offsets, loads.reshape(len(steps), R), R, padded, oversize)


class BalancedBatchSampler:
    """Cost-budgeted, rank-balanced, resumable batch sampler (use as ``DataLoader(batch_sampler=...)``).

    ``cost`` is the per-frame cost (see :class:`~lampretrain.sampling.cost.CostModel`),
    ``dataset``/``weights`` the per-frame dataset id and per-dataset sampling
    probabilities (default: every frame once per epoch). The order depends only
    on (seed, epoch, world size). ``state_dict()`` records (epoch, position);
    a sampler loading it yields exactly the steps the saved one had left.
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
        fill: float = 0.01,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.cost = np.asarray(cost, dtype=np.float64)
        if self.cost.ndim != 1 or not np.isfinite(self.cost).all() or (self.cost < 0).any():
            raise ValueError("per-frame cost must be a 1-D array of finite values >= 0")
        self.dataset = np.zeros(self.cost.size, dtype=np.int64) if dataset is None else np.asarray(dataset, dtype=np.int64)
        if self.dataset.shape != self.cost.shape:
            raise ValueError(f"dataset ids shape {self.dataset.shape} differs from cost shape {self.cost.shape}")
        k = int(self.dataset.max()) + 1 if self.dataset.size else 1
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        if self.weights is not None and self.weights.size < k:
            raise ValueError(f"{self.weights.size} dataset weights for {k} datasets")
        self.budget = float(budget)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch_size, self.seed, self.shuffle = epoch_size, int(seed), shuffle
        self.oversize, self.ids, self.fill = oversize, ids, fill
        self.epoch, self.position = 0, 0
        self._plan: tuple[int, EpochPlan] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's frame indices in stream order, before packing."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.weights is None and self.epoch_size is None:
            return rng.permutation(self.cost.size) if self.shuffle else np.arange(self.cost.size)
        if not self.shuffle:
            raise ValueError("dataset weights or an epoch size need shuffle=True")
        weights = self.weights if self.weights is not None else np.bincount(self.dataset) / self.dataset.size
        return draw_epoch(self.dataset, weights, rng, self.epoch_size)

    def plan(self, epoch: int | None = None) -> EpochPlan:
        epoch = self.epoch if epoch is None else epoch
        if self._plan is None or self._plan[0] != epoch:
            order = self.epoch_order(epoch)
            self._plan = (epoch, plan_epoch(order, self.cost, self.world_size, self.budget, self.fill, self.oversize, self.ids))
        return self._plan[1]

    def mix(self, epoch: int | None = None, natoms: np.ndarray | None = None, names: Sequence[str] | None = None):
        """The effective per-dataset share of frames (and atoms) this epoch, next to the target weights."""
        plan = self.plan(epoch)
        return effective_mix(plan.items, self.dataset, natoms, names, self.weights)

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
