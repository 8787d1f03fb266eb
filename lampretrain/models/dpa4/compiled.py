"""A compiled conservative path: energy → forces → stress as one compiled graph that still trains on forces.

``torch.compile`` cannot differentiate a compiled backward a second time, yet a force
loss needs ∂²E/∂x∂θ. DPA4 (§4.4, deepmd-kit ``trace_and_compile``) therefore turns the
first derivative into ordinary forward ops before compiling (make_fx of
``autograd.grad(create_graph=True)``, then stripping the ``detach`` chains autograd leaves
around saved tensors, which otherwise silently zero the force-loss gradient).

In torch ≥ 2.6 Dynamo inlines ``torch.func.grad_and_value``, which gives the same
result with no hand surgery: the forces and the strain derivative are computed *inside*
the compiled graph as forward ops, AOTAutograd differentiates that graph once for the
parameter gradients, and Dynamo keeps its shape guards (``dynamic=True`` plus
``mark_dynamic`` on atoms, edges and graphs so a new batch size does not recompile).
No ``detach`` is involved on the force path, so nothing needs stripping.
"""

from __future__ import annotations

import torch
from torch import nn

from ...graph.batch import GraphBatch
from ..conservative import strained

_INPUTS = ("positions", "numbers", "batch", "cell", "pbc", "n_atoms", "edge_index", "edge_shift", "dataset")
_DYNAMIC = {"positions": (0,), "numbers": (0,), "batch": (0,), "cell": (0,), "pbc": (0,), "n_atoms": (0,),
            "edge_index": (1,), "edge_shift": (0,), "dataset": (0,)}


def conservative_outputs(model: nn.Module, compute_stress: bool, *tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    """energy (G,), forces (N, 3), stress (G, 3, 3) with the derivatives taken by ``torch.func``.

    Same quantities as ``conservative.energy_forces_stress``: F = −∂E/∂x, σ = (1/V) ∂E/∂ε.
    """
    fields = dict(zip(_INPUTS, tensors))
    empty = {name: fields["positions"].new_zeros(0) for name in GraphBatch.__dataclass_fields__ if name not in fields}
    batch = GraphBatch(**{**empty, **fields})

    def total(positions: torch.Tensor, strain: torch.Tensor):
        pos, cell = strained(batch, positions, batch.cell, strain)
        energy = model.energy(batch, pos, cell)
        return energy.sum(), energy

    strain = torch.zeros_like(batch.cell)
    (d_pos, d_strain), (_, energy) = torch.func.grad_and_value(total, argnums=(0, 1), has_aux=True)(batch.positions, strain)
    out = {"energy": energy, "forces": -d_pos}
    if compute_stress:
        volume = torch.linalg.det(batch.cell).abs()
        periodic = batch.pbc.any(dim=1) & (volume > 0)
        inv_volume = torch.where(periodic, 1.0 / torch.where(periodic, volume, torch.ones_like(volume)), 0.0)
        out["stress"] = d_strain * inv_volume[:, None, None]
    return out


class CompiledConservative:
    """``CompiledConservative(model)(batch)`` → dict like ``model(batch)``, from one compiled graph.

    ``model``: a :class:`~lampretrain.models.multitask.MultiTaskModel` (its ``energy(batch, positions, cell)``).

    Differentiable in the parameters in training mode (a force/stress loss trains through it).
    ``backend``: any ``torch.compile`` backend ("inductor" for speed, "aot_eager" to check tracing).
    The compiled function lives outside the module tree, so DDP/FSDP and ``state_dict`` never see it.
    """

    def __init__(self, model: nn.Module, compute_stress: bool = True, backend: str = "inductor", **options):
        self.model = model
        self.compute_stress = compute_stress
        self.compiled = torch.compile(conservative_outputs, backend=backend, dynamic=True, fullgraph=True, **options)

    def __call__(self, batch: GraphBatch) -> dict[str, torch.Tensor]:
        tensors = []
        for name in _INPUTS:
            t = getattr(batch, name)
            for dim in _DYNAMIC[name]:
                if t.shape[dim] > 1:
                    torch._dynamo.mark_dynamic(t, dim)
            tensors.append(t)
        return self.compiled(self.model, self.compute_stress, *tensors)
