"""Segment reductions over index vectors in plain PyTorch (no torch_scatter)."""

from __future__ import annotations

import torch


def scatter_sum(src: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """out[k] = Σ_{e: index[e]=k} src[e]; ``src`` is (E, ...) and the result (size, ...)."""
    out = src.new_zeros((size,) + tuple(src.shape[1:]))
    return out.index_add_(0, index, src)


def scatter_max(src: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Per-segment maximum, −inf for empty segments; no gradient flows through it."""
    out = src.new_full((size,) + tuple(src.shape[1:]), float("-inf"))
    expanded = index.view(-1, *([1] * (src.dim() - 1))).expand_as(src)
    return out.scatter_reduce(0, expanded, src.detach(), reduce="amax", include_self=True)


def segment_softmax(logits: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """softmax over the entries that share ``index``, per trailing channel.

    α_e = exp(s_e − m_k) / Σ_{e'∈k} exp(s_e' − m_k) with m_k the segment max
    (stable in float32); empty segments simply receive nothing.
    """
    m = scatter_max(logits, index, size)
    z = torch.exp(logits - m[index])
    denom = scatter_sum(z, index, size)
    return z / denom[index]
