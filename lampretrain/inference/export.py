"""The energy/forces/stress function of one dataset head as a size-generic ``torch.export`` program.

``torch.export`` cannot trace ``torch.autograd.grad`` inside a module (non-strict
export leaves the backward's saved tensors as fake constants), so the export
runs in two stages:

1. ``make_fx`` in symbolic mode records the whole function, backward pass
   included (F = −∂E/∂x, σ = (1/V)∂E/∂ε), as plain aten operations. Its inputs
   are fake tensors whose atom, edge, angle and graph counts are free symbols
   (no duck sizing, so a count that happens to equal 2 or 3 is not merged with
   the fixed axes of ``edge_index`` (2, E) or ``cell`` (G, 3, 3)); the example
   needs at least two of each so that no count is specialised to 0 or 1.
2. ``torch.export`` of that graph with :class:`torch.export.Dim` dynamic shapes,
   under ``backed_size_oblivious`` so that a count of 1 (one graph, one bond)
   is not excluded by broadcasting checks on symbols traced at ≥ 2.

The program takes the graph tensors listed in :data:`INPUTS` for any number of
atoms, edges and graphs (build them with :func:`graph_inputs`, i.e.
``lampretrain.graph.batch.collate`` with the cutoffs saved next to the program)
and returns (energy (G,), forces (N, 3), stress (G, 3, 3), zero for molecules).
The neighbor list stays outside the program. Loading it needs only torch:
``torch.export.load(path).module()(*tensors)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from typing import Any, Sequence

import torch
import torch.fx.experimental._config as fx_config
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from ..frames import Frame
from ..graph.batch import GraphBatch, collate
from ..models import graph_cutoffs

INPUTS = (
    "positions", "numbers", "batch", "cell", "pbc", "n_atoms",
    "edge_index", "edge_shift", "edge_reverse", "angle_index",
)
# the variable axis of each input and the count it holds
VARIABLE_AXIS = {
    "positions": (0, "atoms"), "numbers": (0, "atoms"), "batch": (0, "atoms"),
    "cell": (0, "graphs"), "pbc": (0, "graphs"), "n_atoms": (0, "graphs"),
    "edge_index": (1, "edges"), "edge_shift": (0, "edges"), "edge_reverse": (0, "edges"),
    "angle_index": (1, "angles"),
}
METADATA = "lampretrain.json"


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


def graph_inputs(
    frames: Sequence[Frame], cutoff: float, three_body_cutoff: float, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """The :data:`INPUTS` tensors of a batch of structures."""
    batch = collate(list(frames), cutoff=cutoff, three_body_cutoff=three_body_cutoff, dtype=dtype)
    return tuple(getattr(batch, name) for name in INPUTS)


def example_inputs(frames: Frame | Sequence[Frame], model: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The :data:`INPUTS` tensors of one or more structures, built with the model's cutoffs."""
    cutoff, three_body = graph_cutoffs(model)
    return graph_inputs([frames] if isinstance(frames, Frame) else frames, cutoff, three_body, dtype)


def tracing_example(frame: Frame, model: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Two graphs of ``frame`` (the graph count must be ≥ 2 to stay symbolic); any periodic structure will do."""
    return example_inputs([frame, frame], model, dtype)


def _symbolic_trace(function: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.fx.GraphModule:
    mode = FakeTensorMode(shape_env=ShapeEnv(duck_shape=False), allow_non_fake_inputs=True)
    fakes = []
    for name, tensor in zip(INPUTS, inputs):
        axis, count = VARIABLE_AXIS[name]
        size = tensor.shape[axis]
        if count != "angles" and size < 2:
            raise ValueError(f"export: the tracing example needs ≥ 2 {count}, got {size} (input '{name}')")
        dynamic = [
            DimDynamic.DYNAMIC if d == axis and size >= 2 else DimDynamic.STATIC for d in range(tensor.dim())
        ]
        fakes.append(mode.from_tensor(tensor, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dynamic)))
    return make_fx(function, tracing_mode="symbolic")(*fakes)


def dynamic_shapes(inputs: tuple[torch.Tensor, ...]) -> tuple[dict[int, Dim] | None, ...]:
    """One :class:`Dim` per count, shared by every input that holds it; absent counts (no angles) stay fixed."""
    dims = {"atoms": Dim("atoms", min=1), "graphs": Dim("graphs", min=1),
            "edges": Dim("edges", min=0), "angles": Dim("angles", min=0)}
    out = []
    for name, tensor in zip(INPUTS, inputs):
        axis, count = VARIABLE_AXIS[name]
        out.append({axis: dims[count]} if tensor.shape[axis] >= 2 else None)
    return tuple(out)


def export_model(
    model: torch.nn.Module, dataset: str, inputs: tuple[torch.Tensor, ...]
) -> torch.export.ExportedProgram:
    """Trace ``model``'s ``dataset`` head on ``inputs`` (≥ 2 graphs, e.g. :func:`tracing_example`) and export it
    for any number of atoms, edges and graphs."""
    dtype = inputs[0].dtype
    function = HeadFunction(model.to(dtype=dtype).eval(), dataset)
    traced = _symbolic_trace(function, inputs)
    try:
        with fx_config.patch(backed_size_oblivious=True):
            return torch.export.export(traced, inputs, dynamic_shapes=dynamic_shapes(inputs), strict=False)
    except torch._dynamo.exc.UserError as err:
        backbone = type(getattr(model, "backbone", model)).__name__
        raise RuntimeError(
            f"export: {backbone} fixes an atom/edge/angle/graph count while tracing (a Python int() of a tensor "
            f"size, or a shape that depends on tensor values, in its code), so the program would only run at the "
            f"traced sizes:\n{err}"
        ) from None


def export_metadata(model: torch.nn.Module, dataset: str, dtype: torch.dtype) -> dict[str, Any]:
    """What a user of the program needs to build its inputs: cutoffs, input names, dtype, head."""
    cutoff, three_body = graph_cutoffs(model)
    return {
        "dataset": dataset, "cutoff": cutoff, "three_body_cutoff": three_body,
        "dtype": str(dtype).removeprefix("torch."), "inputs": list(INPUTS), "outputs": ["energy", "forces", "stress"],
        "units": {"energy": "eV", "forces": "eV/Å", "stress": "eV/Å³, ASE sign"},
    }


def save_exported(
    program: torch.export.ExportedProgram, path: str | os.PathLike, metadata: dict[str, Any] | None = None
) -> None:
    torch.export.save(program, path, extra_files={METADATA: json.dumps(metadata or {})})


def load_exported(path: str | os.PathLike) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """The program and its metadata (:func:`export_metadata`)."""
    extra = {METADATA: ""}
    program = torch.export.load(path, extra_files=extra)
    return program, json.loads(extra[METADATA] or "{}")

