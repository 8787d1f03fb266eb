"""The contract between a backbone and what is built on it: multi-task heads, fine-tuning, export.

A backbone is an ``nn.Module`` that turns a graph batch into per-atom features; energies, element
references, forces and stress belong to :class:`~lampretrain.models.multitask.MultiTaskModel`.
A family package registers its named sizes with :func:`lampretrain.models.register`; code outside
the package reads only the members below, so a new family needs nothing but its own package.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Protocol, runtime_checkable

import torch

from ..graph.batch import GraphBatch


class NodeFeatures(NamedTuple):
    """What the heads read per atom."""

    scalar: torch.Tensor  # (N, node_channels), invariant under rotations and translations
    vector: torch.Tensor | None  # (N, 3, vector_channels) Cartesian, turns with the structure; None if 0 channels


@runtime_checkable
class Backbone(Protocol):
    """What :class:`MultiTaskModel`, fine-tuning and export rely on.

    ``cutoff`` / ``three_body_cutoff``: Å the graphs are built with (0: no angles).
    ``node_channels`` / ``vector_channels``: widths of :class:`NodeFeatures` (0 vector channels: invariant
    backbone; the vector heads then build vectors along the bonds within ``cutoff``).
    ``default_heads``: ``HeadsConfig`` fields of the single-dataset model ``build(name)`` gives (the
    published readout sizes).
    ``retired_keys``: state-dict names (modules or tensors, relative to the backbone) that older versions
    stored and loading drops.
    """

    cutoff: float
    three_body_cutoff: float
    node_channels: int
    vector_channels: int
    default_heads: Mapping[str, Any]
    retired_keys: tuple[str, ...]

    def node_features(self, batch: GraphBatch, positions: torch.Tensor, cell: torch.Tensor) -> NodeFeatures:
        """Features after the last block; differentiable in ``positions`` and ``cell`` (forces, stress)."""
        ...

    def layers(self) -> list[torch.nn.Module]:
        """Embeddings (one module) first, then the interaction blocks in data-flow order.

        Freezing and layer-wise LR decay count depth along it; parameters outside every layer
        (a final norm) count with the heads.
        """
        ...


def check(backbone: torch.nn.Module) -> Backbone:
    """``backbone`` itself, or ``TypeError`` naming the members of :class:`Backbone` it lacks."""
    if not isinstance(backbone, Backbone):
        missing = [m for m in (*Backbone.__annotations__, "node_features", "layers") if not hasattr(backbone, m)]
        raise TypeError(f"{type(backbone).__name__} is not a Backbone: missing {', '.join(missing)}")
    return backbone


def without_retired(state: Mapping[str, Any], backbone: Backbone, prefix: str = "backbone.") -> dict[str, Any]:
    """``state`` minus the entries under ``prefix`` + one of ``backbone.retired_keys``."""
    retired = [prefix + key for key in backbone.retired_keys]
    return {k: v for k, v in state.items() if not any(k == r or k.startswith(r + ".") for r in retired)}
