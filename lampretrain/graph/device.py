"""Graph building on the accelerator: the same edges, reverse ids and angles as the numpy path.

When the data-loader CPUs are the bottleneck, workers collate atoms only
(``collate(..., with_graph=False)``) and the trainer calls
:func:`attach_graph` after moving the batch to the GPU. Neighbor lists come
from ``vesin.torch`` (CPU or CUDA tensors); sorting, reverse edges and bond
pairs are torch ops, so nothing returns to the host.

Edges follow the conventions of :mod:`lampretrain.neighbors` exactly (sorted
by centre, neighbor, shift). Distances are computed in float64 from the
batch positions; with a float32 batch the positions were already rounded, so
a pair within ~1e-6 Å of the cutoff may differ from the float64 CPU path.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from .batch import GraphBatch


def _vesin_torch():
    try:
        from vesin_torch import NeighborList
    except ImportError as exc:  # the CPU path needs only numpy vesin
        raise ImportError(
            "on-device graph building needs vesin-torch (pip install vesin-torch)"
        ) from exc
    return NeighborList


def lexsort(keys: Sequence[torch.Tensor]) -> torch.Tensor:
    """Permutation sorting by ``keys[0]``, ties by ``keys[1]``, ... (stable radix of stable sorts)."""
    order = torch.arange(keys[0].shape[0], device=keys[0].device)
    for key in reversed(keys):
        order = order[torch.sort(key[order], stable=True).indices]
    return order


def reverse_edges(i: torch.Tensor, j: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """For each edge i→j (shift S) the id of the edge j→i with shift −S, (E,)."""
    key = lexsort([i, j, shifts[:, 0], shifts[:, 1], shifts[:, 2]])
    rev_key = lexsort([j, i, -shifts[:, 0], -shifts[:, 1], -shifts[:, 2]])
    reverse = torch.empty_like(i)
    reverse[key] = rev_key
    return reverse


def angle_pairs(centre: torch.Tensor, short: torch.Tensor) -> torch.Tensor:
    """Ordered pairs (e1, e2), e1 ≠ e2, of edges ``short`` (sorted by ``centre``) with one centre, (2, Σ k(k−1))."""
    if short.numel() == 0:
        return torch.zeros((2, 0), dtype=torch.long, device=short.device)
    _, k = torch.unique_consecutive(centre, return_counts=True)
    start = torch.cumsum(k, 0) - k
    group_size = torch.repeat_interleave(k, k)  # size of the group each short edge sits in
    group_start = torch.repeat_interleave(start, k)
    first = torch.repeat_interleave(torch.arange(short.numel(), device=short.device), group_size)
    block_start = torch.repeat_interleave(torch.cumsum(group_size, 0) - group_size, group_size)
    second = torch.repeat_interleave(group_start, group_size) + (
        torch.arange(first.numel(), device=short.device) - block_start
    )
    keep = first != second
    return torch.stack([short[first[keep]], short[second[keep]]])


def _structure_edges(nl, positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor):
    """Unsorted (i, j, S, d) of one structure; molecules get a zero box and no periodicity."""
    periodic = bool(pbc.any())
    box = cell if periodic else torch.zeros_like(cell)
    i, j, s, d = nl.compute(
        points=positions, box=box, periodic=pbc if periodic else False, quantities="ijSd"
    )
    return i, j, s.to(torch.long), d


def attach_graph(batch: GraphBatch, cutoff: float = 6.0, three_body_cutoff: float = 4.5) -> GraphBatch:
    """A copy of ``batch`` with edges (< ``cutoff``) and angles (< ``three_body_cutoff``) built where it lives."""
    NeighborList = _vesin_torch()
    nl = NeighborList(cutoff=float(max(cutoff, three_body_cutoff)), full_list=True)
    positions = batch.positions.detach().to(torch.float64)
    cell = batch.cell.detach().to(torch.float64)
    counts = batch.n_atoms.tolist()
    offsets = [0]
    for n in counts[:-1]:
        offsets.append(offsets[-1] + n)
    parts = [
        _structure_edges(nl, positions[o : o + n], cell[g], batch.pbc[g])
        for g, (o, n) in enumerate(zip(offsets, counts))
    ]
    device = batch.positions.device
    i = torch.cat([p[0] + o for p, o in zip(parts, offsets)]) if parts else torch.zeros(0, dtype=torch.long, device=device)
    j = torch.cat([p[1] + o for p, o in zip(parts, offsets)]) if parts else torch.zeros(0, dtype=torch.long, device=device)
    s = torch.cat([p[2] for p in parts]) if parts else torch.zeros((0, 3), dtype=torch.long, device=device)
    d = torch.cat([p[3] for p in parts]) if parts else torch.zeros(0, dtype=torch.float64, device=device)
    keep = d < cutoff
    i, j, s, d = i[keep], j[keep], s[keep], d[keep]
    order = lexsort([i, j, s[:, 0], s[:, 1], s[:, 2]])
    i, j, s, d = i[order], j[order], s[order], d[order]
    short = torch.nonzero(d < three_body_cutoff).flatten()
    return replace(
        batch,
        edge_index=torch.stack([i, j]),
        edge_shift=s.to(batch.positions.dtype),
        edge_reverse=reverse_edges(i, j, s),
        angle_index=angle_pairs(i[short], short),
    )
