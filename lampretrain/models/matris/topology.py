"""Index maps of the atom graph and the line graph, derived from a batch's directed edges.

MatRIS keeps bond features on undirected bonds: bond u joins the directed edge
pair (e, reverse(e)). The line graph's nodes are these bonds and its edges the
batch's angles (e₁, e₂), with target bond(e₁) and source bond(e₂).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...graph.batch import GraphBatch


@dataclass
class Topology:
    centre: torch.Tensor  # (E,) atom i of each directed edge i→j (attention target)
    neighbor: torch.Tensor  # (E,) atom j (attention source)
    bond: torch.Tensor  # (E,) undirected bond of each directed edge
    bond_edge: torch.Tensor  # (B,) one directed edge of each bond
    angle_edge1: torch.Tensor  # (A,) directed edge e₁ (target side)
    angle_target: torch.Tensor  # (A,) bond(e₁)
    angle_source: torch.Tensor  # (A,) bond(e₂)
    # sizes stay as given (SymInt under symbolic tracing): int() would fix them to the traced values
    num_atoms: int
    num_bonds: int

    @property
    def num_angles(self) -> int:
        return self.angle_target.shape[0]


def topology(batch: GraphBatch) -> Topology:
    """Bond ids as ranks of the lower edge id of each reverse pair; no host sync beyond sizes."""
    reverse = batch.edge_reverse
    ids = torch.arange(reverse.shape[0], device=reverse.device)
    lower = ids < reverse  # (E,) the edge that represents its bond
    rank = torch.cumsum(lower.long(), 0) - 1
    bond = rank[torch.minimum(ids, reverse)]
    e1, e2 = batch.angle_index
    return Topology(
        centre=batch.edge_index[0],
        neighbor=batch.edge_index[1],
        bond=bond,
        bond_edge=ids[lower],
        angle_edge1=e1,
        angle_target=bond[e1],
        angle_source=bond[e2],
        num_atoms=batch.positions.shape[0],
        num_bonds=reverse.shape[0] // 2,
    )
