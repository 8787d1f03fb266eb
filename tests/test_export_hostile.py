"""Hostile .pt2 files: each payload runs code under plain ``torch.export.load`` (shown in a subprocess that
would create a marker file) and is refused by ``load_exported`` with a one-line CheckpointError, no marker."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from test_export import REAL, tiny_model

from lampretrain.inference.export import (
    example_inputs,
    export_metadata,
    export_model,
    load_exported,
    save_exported,
    tracing_example,
)
from lampretrain.io import read_frames
from lampretrain.train.checkpoint import CheckpointError

PLAIN = """
import sys, torch
ep = torch.export.load(sys.argv[1])
if sys.argv[2] == "run":
    import numpy as np
    arrays = np.load(sys.argv[3], allow_pickle=False)
    ep.module()(*[torch.from_numpy(arrays[n]) for n in arrays.files])
"""


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    model = tiny_model("matris-10m")
    oxide6 = next(f for f in read_frames(REAL / "fairchem_oxides_asedb" / "oxides.db") if f.natoms == 6)
    inputs = tracing_example(oxide6, model, torch.float64)
    save_exported(export_model(model, "mptrj", inputs), tmp / "model.pt2", export_metadata(model, "mptrj", torch.float64))
    import numpy as np

    from lampretrain.inference.export import INPUTS
    np.savez(tmp / "inputs.npz", **{n: t.numpy() for n, t in zip(INPUTS, example_inputs(oxide6, model, torch.float64))})
    return tmp


def rewrite(src: Path, dst: Path, change) -> None:
    """Copy the archive, letting ``change(members)`` edit the {relative name: bytes} dict."""
    with zipfile.ZipFile(src) as z:
        root = z.namelist()[0].split("/")[0]
        members = {n[len(root) + 1:]: z.read(n) for n in z.namelist()}
    change(members)
    with zipfile.ZipFile(dst, "w") as z:
        for rel, data in members.items():
            z.writestr(f"{root}/{rel}", data)


def edit_program(members, change) -> None:
    program = json.loads(members["models/model.json"])
    change(program)
    members["models/model.json"] = json.dumps(program).encode()


def live_then_refused(tmp: Path, name: str, change, run: bool, refusal: str, live: bool = True) -> None:
    marker = tmp / f"{name}.marker"
    hostile = tmp / f"{name}.pt2"
    rewrite(tmp / "model.pt2", hostile, lambda m: change(m, f"touch {marker}"))
    (tmp / "plain.py").write_text(PLAIN)
    done = subprocess.run([sys.executable, str(tmp / "plain.py"), str(hostile), "run" if run else "load", str(tmp / "inputs.npz")],
                          capture_output=True, text=True, timeout=300, cwd=tmp)
    if live:
        assert marker.exists(), f"{name}: the payload is not live under plain torch.export.load"
        marker.unlink()
    else:  # torch 2.13's verifier happens to stop this one; we must not rely on it
        assert not marker.exists() and "SpecViolationError" in done.stderr, done.stderr[-2000:]
    with pytest.raises(CheckpointError) as err:
        load_exported(hostile)
    message = str(err.value)
    assert "\n" not in message and str(hostile) in message and refusal in message, message
    assert not marker.exists()


def test_genuine_export_loads_and_runs_like_plain_torch(genuine):
    import numpy as np
    program, meta = load_exported(genuine / "model.pt2")
    assert meta["dataset"] == "mptrj"
    arrays = np.load(genuine / "inputs.npz", allow_pickle=False)
    tensors = [torch.from_numpy(arrays[n]) for n in arrays.files]
    ours = program.module()(*tensors)
    plain = torch.export.load(genuine / "model.pt2").module()(*tensors)
    for a, b in zip(ours, plain):
        assert torch.equal(a, b)


def test_node_target_torch_os_system(genuine):
    def change(members, command):
        def program(p):
            node = next(n for n in p["graph_module"]["graph"]["nodes"] if n["target"] == "torch.ops.aten.cos.default")
            node["target"] = "torch.os.system"
            node["inputs"] = [{"name": "command", "arg": {"as_string": command}, "kind": 1}]
        edit_program(members, program)
    # torch resolves the name to os.system (getattr walk); its verifier then rejects the top-level node
    live_then_refused(genuine, "os_system", change, run=True, refusal="graph node target 'torch.os.system'", live=False)


def test_expr_str_eval(genuine):
    def change(members, command):
        def program(p):
            values = p["graph_module"]["graph"]["sym_int_values"]
            first = next(iter(values.values()))
            first["as_expr"]["expr_str"] = f"__import__('os').system('{command}')"
        edit_program(members, program)
    live_then_refused(genuine, "expr_str", change, run=False, refusal="symbolic expression")


def test_guards_code_exec(genuine):
    def change(members, command):
        edit_program(members, lambda p: p["guards_code"].append(f"__import__('os').system('{command}') == 0"))
    live_then_refused(genuine, "guards", change, run=True, refusal="guard")


class Payload:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os
        return os.system, (self.command,)


def test_pickled_custom_object_constant(genuine):
    def change(members, command):
        members["data/constants/opaque_obj_0"] = pickle.dumps(Payload(command))
        members["data/constants/model_constants_config.json"] = json.dumps(
            {"config": {"evil": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}}}
        ).encode()
    live_then_refused(genuine, "custom_obj", change, run=False, refusal="opaque_obj_0")


def test_example_inputs_only_loadable_with_weights_only_false(genuine):
    def change(members, command):
        buffer = io.BytesIO()
        torch.save(((Payload(command),), {}), buffer)
        members["data/sample_inputs/model.pt"] = buffer.getvalue()
    live_then_refused(genuine, "sample_inputs", change, run=False, refusal="loads only with weights_only=False")


def test_extension_operator_refused(genuine, tmp_path):
    def change(members):
        def program(p):
            p["graph_module"]["graph"]["nodes"][0]["target"] = "#custom_ns:op"
        edit_program(members, program)
    rewrite(genuine / "model.pt2", tmp_path / "ext.pt2", change)
    with pytest.raises(CheckpointError, match="extension operator"):
        load_exported(tmp_path / "ext.pt2")
