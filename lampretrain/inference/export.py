"""The energy/forces/stress function of one dataset head as a ``torch.export`` program.

``torch.export`` cannot trace ``torch.autograd.grad`` inside a module, so the
function is first traced with ``make_fx``, which records the backward pass
(F = −∂E/∂x, σ = (1/V)∂E/∂ε) as plain aten operations; that graph is then
exported. The program takes the graph tensors listed in :data:`INPUTS` (build
them with :func:`example_inputs`, i.e. ``lampretrain.graph.batch.collate``) and
returns (energy (G,), forces (N, 3), stress (G, 3, 3)). Shapes are those of the
example structure the program was traced on (``make_fx`` bakes sizes into the
graph); trace once per structure size, e.g. per MD system.
"""

from __future__ import annotations

import os
from dataclasses import fields

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from ..graph.batch import GraphBatch, collate
from ..frames import Frame
from .loading import graph_cutoffs

INPUTS = (
    "positions", "numbers", "batch", "cell", "pbc", "n_atoms",
    "edge_index", "edge_shift", "edge_reverse", "angle_index",
)


class HeadFunction(torch.nn.Module):
    """(graph tensors) → (energy, forces, stress) of a multi-task model with one dataset's head."""

    def __init__(self, model: torch.nn.Module, dataset: str):
        super().__init__()
        self.model = model
        self.dataset = dataset
        self.index = model.dataset_index(dataset)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        given = dict(zip(INPUTS, tensors))
        n_graphs = given["n_atoms"].shape[0]
        empty = {f.name: None for f in fields(GraphBatch)}
        dataset = torch.full((n_graphs,), self.index, dtype=torch.long, device=given["positions"].device)
        batch = GraphBatch(**{**empty, **given, "dataset": dataset})
        out = self.model(batch, compute_forces=True, compute_stress=True)
        return out["energy"], out["forces"], out["stress"]


def example_inputs(frame: Frame, model: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The :data:`INPUTS` tensors of one structure, built with the model's cutoffs."""
    cutoff, three_body = graph_cutoffs(model)
    batch = collate([frame], cutoff=cutoff, three_body_cutoff=three_body, dtype=dtype)
    return tuple(getattr(batch, name) for name in INPUTS)


def export_model(
    model: torch.nn.Module, dataset: str, inputs: tuple[torch.Tensor, ...]
) -> torch.export.ExportedProgram:
    """Trace ``model``'s ``dataset`` head on ``inputs`` (from :func:`example_inputs`) and export it."""
    dtype = inputs[0].dtype
    function = HeadFunction(model.to(dtype=dtype).eval(), dataset)
    traced = make_fx(function)(*inputs)
    return torch.export.export(traced, inputs, strict=False)


def save_exported(program: torch.export.ExportedProgram, path: str | os.PathLike) -> None:
    torch.export.save(program, path)


def load_exported(path: str | os.PathLike) -> torch.export.ExportedProgram:
    return torch.export.load(path)
