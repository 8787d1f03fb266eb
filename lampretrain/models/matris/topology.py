"""Index maps of the atom graph and the line graph, derived from a batch's directed edges.

MatRIS keeps bond features on undirected bonds: bond u joins the directed edge
pair (e, reverse(e)). The line graph's nodes are these bonds and its edges the
batch's angles (e₁, e₂), with target bond(e₁) and source bond(e₂).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...graph.batch import GraphBatch
from ..layers.scatter import Segments


@dataclass
class Topology:
    """Every many-to-one map is a :class:`Segments`: gathered along it and summed back over it many times per step."""

    centre: Segments  # (E,) → atoms: atom i of each directed edge i→j (attention target)
    neighbor: Segments  # (E,) → atoms: atom j (attention source)
    bond: Segments  # (E,) → bonds: undirected bond of each directed edge
    bond_edge: torch.Tensor  # (B,) one directed edge of each bond
    angle_edge1: Segments  # (A,) → edges: directed edge e₁ (target side)
    angle_target: Segments  # (A,) → bonds: bond(e₁)
    angle_source: Segments  # (A,) → bonds: bond(e₂)

    @property
    def num_angles(self) -> int:
        return self.angle_target.index.shape[0]


def topology(batch: GraphBatch) -> Topology:
    """Bond ids as ranks of the lower edge id of each reverse pair; no host sync beyond sizes."""
    reverse = batch.edge_reverse
    ids = torch.arange(reverse.shape[0], device=reverse.device)
    lower = ids < reverse  # (E,) the edge that represents its bond
    rank = torch.cumsum(lower.long(), 0) - 1
    bond = rank[torch.minimum(ids, reverse)]
    e1, e2 = batch.angle_index
    # sizes stay as given (SymInt under symbolic tracing): int() would fix them to the traced values
    num_atoms, num_bonds = batch.positions.shape[0], reverse.shape[0] // 2
    return Topology(
        centre=Segments(batch.edge_index[0], num_atoms),
        neighbor=Segments(batch.edge_index[1], num_atoms),
        bond=Segments(bond, num_bonds),
        bond_edge=ids[lower],
        angle_edge1=Segments(e1, reverse.shape[0]),
        angle_target=Segments(bond[e1], num_bonds),
        angle_source=Segments(bond[e2], num_bonds),
    )
