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
The neighbor list stays outside the program. Running it needs only torch:
``torch.export.load(path).module()(*tensors)``, but only on a file you made yourself.

A file from anywhere must be loaded with :func:`load_exported`, never with ``torch.export.load``
itself: torch runs code chosen by the file. A graph node's target is looked up by walking ``getattr``
from ``torch``/``math``/``_operator`` along a dotted name (``torch.os.system`` is called when the
program runs); symbolic-shape strings go through ``sympy.sympify`` (an ``eval``); ``guards_code``
strings, node names and constant placeholders are pasted into Python source that ``.module()``
``exec``s; custom objects are unpickled without restriction, pickled weights and constants with
``torch.load(weights_only=False)``, and example inputs fall back to it when the weights-only load
fails. :func:`load_exported` reads the archive once, checks it (the guarantee is in its docstring)
and hands torch an in-memory copy of exactly the bytes it checked; a refusal is a one-line
:class:`~lampretrain.train.checkpoint.CheckpointError` naming the file, the archive member and the
reason.
"""

from __future__ import annotations

import io
import json
import keyword
import os
import re
import zipfile
from dataclasses import fields
from typing import Any, Sequence

import torch
import torch.fx.experimental._config as fx_config
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from ..errors import one_line
from ..frames import Frame
from ..graph.batch import GraphBatch, collate
from ..models import graph_cutoffs
from ..train.checkpoint import CheckpointError

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
        raise RuntimeError(
            f"export: the backbone ({model.config.backbone}) fixes an atom/edge/angle/graph count while tracing (a "
            f"Python int() of a tensor size, or a shape that depends on tensor values, in its code), so the program "
            f"would only run at the traced sizes:\n{err}"
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


# ---- loading a .pt2 from anywhere -------------------------------------------------------------------
# Every allow-list below is exact and was read off real exports of both backbone families (tiny
# configurations of matris and dpa4, see tests/test_export.py): a model change that makes torch emit
# anything new is refused until it is added here, on purpose, after checking that it cannot run code.

# aten operators our exports contain. The pattern torch.ops.aten.<name>.<overload> alone is not
# enough: aten.save writes a pickle to any path and aten.from_file(shared=True) maps a file for
# writing, both reachable from a graph node.
_ATEN_OPS = frozenset("""
_assert_scalar.default _linalg_det.default _to_copy.default _unsafe_view.default abs.default
acos.default add.Scalar add.Tensor add_.Tensor addcmul.default addmm.default addmm_.default any.dim
arange.default bitwise_and.Tensor bmm.default cat.default clamp.default clamp_min.default
clone.default cos.default cumsum.default detach.default div.Scalar div.Tensor embedding.default
eq.Scalar exp.default exp_.default expand.default full.default full_like.default gather.default
ge.Scalar gt.Scalar index.Tensor index_add.default index_add_.default index_put.default
index_select.default le.Scalar lift_fresh_copy.default linalg_vector_norm.default
logical_and_.default lt.Scalar lt.Tensor masked_fill_.Scalar mean.dim minimum.default mm.default
mul.Scalar mul.Tensor native_layer_norm.default native_layer_norm_backward.default neg.default
new_full.default new_zeros.default ones_like.default permute.default pow.Tensor_Scalar
reciprocal.default rsqrt.default rsub.Scalar scalar_tensor.default scatter_add.default
scatter_reduce.two select.int select_backward.default sigmoid.default sigmoid_backward.default
silu.default silu_backward.default sin.default slice.Tensor slice_backward.default softplus.default
split.Tensor split_with_sizes.default squeeze.dim stack.default sub.Tensor sum.default
sum.dim_IntList sym_size.int t.default tanh.default tanh_backward.default transpose.int unbind.int
unsqueeze.default view.default where.self zeros_like.default
""".split())
# Python-level shape arithmetic on symbolic sizes that our exports contain (no math.*, no torch.sym_*).
_OTHER_TARGETS = frozenset({"_operator.eq", "_operator.floordiv", "_operator.ge", "_operator.mul"})
_TARGETS = frozenset({f"torch.ops.aten.{op}" for op in _ATEN_OPS}) | _OTHER_TARGETS

# Symbolic expressions are sympy srepr text, e.g. "FloorDiv(Symbol('s56', positive=True,
# integer=True), Integer(2))", given to sympy.sympify, i.e. eval. Only these tokens may occur, so the
# eval can do nothing but build sympy integer arithmetic and relations: the class names below, a
# quoted symbol name s<N>/u<N> (the only quoted text), integers, True/False, keyword flags, punctuation.
_SYMPY_CALLS = frozenset({"Symbol", "Integer", "Add", "Mul", "FloorDiv", "Mod", "PythonMod", "Max", "Min",
                          "Equality", "Unequality", "GreaterThan", "LessThan", "StrictGreaterThan",
                          "StrictLessThan"})
_SYMPY_FLAGS = frozenset({"positive", "integer", "nonnegative", "True", "False"})
_EXPR_TOKEN = re.compile(r"\s+|'[su]\d+'|\d+|[A-Za-z]+|[(),=+\-*/%]|[<>=!]=|[<>]")
_SYMBOL = re.compile(r"[su]\d+")
# guards_code is pasted into a Python function that .module() execs. Ours only compare sizes of the
# inputs: L['<name>'].size()[<i>], integers, arithmetic, comparisons, parentheses.
_GUARD_TOKEN = re.compile(r"\s+|L\['[A-Za-z][A-Za-z0-9_]*'\]\.size\(\)\[\d+\]|\d+|==|!=|<=|>=|//|[<>()+\-*%]")
_MAX_EXPR = 4096  # ours are < 200 characters; a cap keeps huge integer arithmetic out of the eval

# names torch pastes into generated Python source (placeholders, node outputs, attributes)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME_FIELDS = ("name", "as_name", "parameter_name", "buffer_name", "tensor_constant_name", "fqn")
_VALUE_MAPS = ("tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values")
_NODE_META = frozenset({"stack_trace", "nn_module_stack", "torch_fn", "from_node"})
# argument kinds with a callable, a subgraph or a custom object behind them
_REFUSED_ARGS = {"as_operator": "an operator passed as an argument", "as_graph": "a subgraph",
                 "as_custom_obj": "a custom object", "as_custom_objs": "custom objects"}

# the exact members of a torch.export.save archive of ours, below its one root folder
_FIXED_MEMBERS = frozenset({
    "archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
    "models/model.json", "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json", "data/sample_inputs/model.pt", f"extra/{METADATA}",
})
_PAYLOAD = re.compile(r"data/(weights/weight|constants/tensor)_\d+")


def _refuse(path, member: str, reason: str) -> CheckpointError:
    return CheckpointError(f"{path}: {member}: {reason}; refusing to load it (it could run code)")


def _check_expr(path, member: str, text: Any) -> None:
    if not isinstance(text, str) or len(text) > _MAX_EXPR or "**" in text:
        raise _refuse(path, member, f"symbolic expression {str(text)[:80]!r} is not plain integer arithmetic")
    pos = 0
    while pos < len(text):
        m = _EXPR_TOKEN.match(text, pos)
        word = m.group() if m else text[pos]
        if m is None or (word.isalpha() and word not in _SYMPY_CALLS | _SYMPY_FLAGS):
            raise _refuse(path, member, f"symbolic expression {text[:80]!r} contains {word!r}")
        pos = m.end()


def _check_guard(path, member: str, text: Any) -> None:
    if not isinstance(text, str) or len(text) > _MAX_EXPR or "**" in text:
        raise _refuse(path, member, f"guard {str(text)[:80]!r} is not a comparison of input sizes")
    pos = 0
    while pos < len(text):
        m = _GUARD_TOKEN.match(text, pos)
        if m is None:
            raise _refuse(path, member, f"guard {text[:80]!r} contains {text[pos:pos + 20]!r}")
        pos = m.end()


def _check_program(path, member: str, program: dict) -> None:
    """The checks on models/model.json: targets, expressions, guards, names, argument kinds."""

    def walk(obj: Any, key: str | None) -> None:
        if isinstance(obj, dict):
            if "target" in obj and "inputs" in obj:  # a graph node
                target = obj["target"]
                if not isinstance(target, str) or target not in _TARGETS:
                    what = "an extension operator" if str(target).startswith("#") else "not an allowed operator"
                    raise _refuse(path, member, f"graph node target {str(target)[:100]!r} is {what}")
                meta = obj.get("metadata") or {}
                if not isinstance(meta, dict) or set(meta) - _NODE_META:
                    raise _refuse(path, member, f"node metadata {sorted(meta)[:5]!r} beyond {sorted(_NODE_META)}")
            for k, v in obj.items():
                if k in _REFUSED_ARGS:
                    raise _refuse(path, member, f"{_REFUSED_ARGS[k]} ({k}); our exports hold only tensors")
                if k == "expr_str":
                    _check_expr(path, member, v)
                elif k == "guards_code":
                    for guard in v if isinstance(v, list) else [v]:
                        _check_guard(path, member, guard)
                elif k in _NAME_FIELDS and isinstance(v, str):
                    if not all(_IDENT.fullmatch(p) and not keyword.iskeyword(p) for p in v.split(".")) and v != "":
                        raise _refuse(path, member, f"{k} {v[:80]!r} is not a Python identifier")
                if k in _VALUE_MAPS and isinstance(v, dict):
                    for name in v:
                        if not _IDENT.fullmatch(name) or keyword.iskeyword(name):
                            raise _refuse(path, member, f"value name {name[:80]!r} is not a Python identifier")
                if k == "custom_obj_values" and v:
                    raise _refuse(path, member, "custom object values; our exports hold only tensors")
                walk(v, k)
        elif isinstance(obj, list):
            for v in obj:
                walk(v, key)
        elif isinstance(obj, str) and any(ord(c) < 32 or c in "\x7f\x85\u2028\u2029" for c in obj):
            # strings end up in generated source (comments, names): a line break would start new code
            raise _refuse(path, member, f"string {obj[:60]!r} under {key!r} contains a control character")

    graph = program.get("graph_module", {}).get("graph", {})
    for spec in graph.get("inputs", []):  # a constant placeholder is pasted into guard code as text
        if not (isinstance(spec, dict) and set(spec) == {"as_tensor"}):
            raise _refuse(path, member, f"graph input {str(spec)[:80]!r} is not a tensor")
    for name, bounds in (program.get("range_constraints") or {}).items():
        if not _SYMBOL.fullmatch(name) or not all(
            type(bounds.get(b)) is int or bounds.get(b) is None for b in ("min_val", "max_val")
        ):
            raise _refuse(path, member, f"range constraint {name[:40]!r}: {str(bounds)[:80]} is not a symbol's integer range")
    walk(program, None)


def _check_payload_config(path, member: str, config: dict, members: set[str], folder: str) -> None:
    """Weights and constants are raw tensor bytes here; torch unpickles 'use_pickle' entries with
    weights_only=False and custom/opaque objects with no restriction at all, so they are refused."""
    entries = config.get("config")
    if not isinstance(entries, dict):
        raise _refuse(path, member, "not a payload config")
    for fqn, entry in entries.items():
        name = entry.get("path_name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not _PAYLOAD.fullmatch(f"{folder}/{name}") or f"{folder}/{name}" not in members:
            raise _refuse(path, member, f"entry {fqn!r} is a custom object or missing file ({str(name)[:60]!r}); "
                                        "our exports hold only tensors")
        if entry.get("use_pickle") is not False:
            raise _refuse(path, member, f"entry {fqn!r} is pickled; our exports store raw tensor bytes")


def _checked_archive(path, data: bytes) -> bytes:
    """A new zip of exactly the members that passed the checks (so torch's own zip reader cannot
    see anything that zipfile did not show us)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a .pt2 archive ({err})") from None
    names = [i.filename for i in infos]
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or len(set(names)) != len(names):
        raise _refuse(path, "(archive)", "not one root folder of unique members")
    root = roots.pop()
    members: dict[str, bytes] = {}
    for info in infos:
        rel = info.filename[len(root) + 1:]
        if rel not in _FIXED_MEMBERS and not _PAYLOAD.fullmatch(rel):
            raise _refuse(path, info.filename, "is not a member of a lampretrain export (custom object, "
                                               "legacy pickle, compiled code or other file)")
        members[rel] = archive.read(info)
    for rel in ("archive_format", "archive_version", "models/model.json", "data/weights/model_weights_config.json",
                "data/constants/model_constants_config.json", "data/sample_inputs/model.pt"):
        if rel not in members:
            raise CheckpointError(f"{path}: not a lampretrain export (no {root}/{rel})")
    if members["archive_format"] != b"pt2":
        raise _refuse(path, f"{root}/archive_format", "is not 'pt2'")

    def parsed(rel: str) -> dict:
        try:
            value = json.loads(members[rel])
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: {root}/{rel}: not JSON ({err})") from None
        if not isinstance(value, dict):
            raise CheckpointError(f"{path}: {root}/{rel}: not a JSON object")
        return value

    _check_program(path, f"{root}/models/model.json", parsed("models/model.json"))
    _check_payload_config(path, f"{root}/data/weights/model_weights_config.json",
                          parsed("data/weights/model_weights_config.json"), set(members), "data/weights")
    _check_payload_config(path, f"{root}/data/constants/model_constants_config.json",
                          parsed("data/constants/model_constants_config.json"), set(members), "data/constants")
    # torch loads the example inputs with weights_only=True and, if that fails, weights_only=False:
    # trying the same bytes first means the fallback never runs (a file needing it is refused)
    sample = members["data/sample_inputs/model.pt"]
    if sample:
        try:
            torch.load(io.BytesIO(sample), weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means torch would fall back
            raise _refuse(path, f"{root}/data/sample_inputs/model.pt",
                          f"loads only with weights_only=False ({one_line(str(err))[:160]})") from None
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as fresh:
        for rel, content in members.items():
            fresh.writestr(f"{root}/{rel}", content)
    return out.getvalue()


def load_exported(path: str | os.PathLike) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """The program and its metadata (:func:`export_metadata`), from a file from anywhere.

    Guarantee (torch 2.13 archive format): before torch sees the file, it is read once and refused
    unless it holds only the members of an export of ours; every graph node target is one of an exact
    list of aten operators and ``_operator`` functions; every symbolic expression is made of an exact
    list of sympy integer-arithmetic names, quoted ``s<N>``/``u<N>`` symbols and integers; every guard
    compares input sizes; names pasted into generated code are identifiers and no string holds a line
    break; graph inputs are tensors; weights and constants are raw tensor bytes (no pickles, no custom
    or opaque objects); and the example inputs load with ``torch.load(weights_only=True)``, so torch's
    ``weights_only=False`` fallback never runs. torch then loads an in-memory copy of exactly the
    checked bytes. So no name or string in the file reaches ``getattr`` walks outside that list,
    ``eval``/``exec`` of anything but that arithmetic, or an unrestricted unpickler. Not guaranteed:
    that the program computes anything sensible. A refusal is a one-line
    :class:`~lampretrain.train.checkpoint.CheckpointError` naming the file, the member and the reason.
    Do not use ``torch.export.load`` itself on a file you did not make.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from None
    extra = {METADATA: ""}
    program = torch.export.load(io.BytesIO(_checked_archive(path, data)), extra_files=extra)
    return program, json.loads(extra[METADATA] or "{}")
