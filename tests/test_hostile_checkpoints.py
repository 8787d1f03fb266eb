"""Planted checkpoints cannot run code: every payload is first shown to be live (a plain unpickler runs it),
then refused with one line at every entry point that reads a checkpoint, and the command it carries never runs.

The attacker here controls the whole directory, so each planted checkpoint gets a matching ``COMPLETE.json``
(a checksum, not a signature) and passes :func:`lampretrain.train.checkpoint.verify`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml

from lampretrain import cli
from lampretrain.files import file_sha256
from lampretrain.train import checkpoint as ckpt

from finetune_support import FEO, oxides_slice, tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")

MD_MOD = "torch.distributed.checkpoint.metadata"
FS_MOD = "torch.distributed.checkpoint.filesystem"


# --- a tiny pickle assembler: payloads are written opcode by opcode, as an attacker would -------------------
def _s(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE


def _global(module: str, name: str) -> bytes:
    return _s(module) + _s(name) + b"\x93"  # STACK_GLOBAL (protocol 4: a dotted name walks attributes)


def _call1(func: bytes, arg: bytes) -> bytes:
    return func + arg + b"\x85R"  # TUPLE1, REDUCE


def _call2(func: bytes, a: bytes, b: bytes) -> bytes:
    return func + a + b + b"\x86R"  # TUPLE2, REDUCE


def _pickle(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."


class _Reduce:
    """The textbook ``__reduce__`` payload."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def metadata_payloads(command: str) -> dict[str, bytes]:
    """Hostile ``.metadata`` pickles; each runs ``command`` under a plain ``pickle.loads``."""
    cmd = _s(command)
    getattr_ = _global("builtins", "getattr")
    os_module = _call1(_call2(getattr_, _call2(getattr_, _global("torch.serialization", "_get_layout"),
                                                _s("__globals__")), _s("get")), _s("os"))
    return {
        # a name under an allowed module resolving, attribute by attribute, to os.system
        "dotted_os_system": _pickle(_call1(_global(FS_MOD, "os.system"), cmd)),
        "dotted_via_allowed_class": _pickle(_call1(_global(MD_MOD, "Metadata.__init__.__globals__.get"),
                                                   _s("os")) + b"0" + _call1(_global(FS_MOD, "os.system"), cmd)),
        # builtins.getattr as a gadget: _get_layout.__globals__.get("os").system(command)
        "getattr_gadget": _pickle(_call1(_call2(getattr_, os_module, _s("system")), cmd)),
        # a second, unrestricted unpickler fed from the file
        "pickle_loads_reentry": _pickle(_call1(_global("pickle", "loads"), _bytes(pickle.dumps(_Reduce(command))))),
        "pickle_loads_dotted": _pickle(_call1(_global(FS_MOD, "pickle.loads"), _bytes(pickle.dumps(_Reduce(command))))),
        "reduce_object": pickle.dumps(_Reduce(command), protocol=4),
        "reduce_object_protocol0": pickle.dumps(_Reduce(command), protocol=0),
    }


def _bytes(raw: bytes) -> bytes:
    return b"C" + bytes([len(raw)]) + raw if len(raw) < 256 else b"B" + struct.pack("<I", len(raw)) + raw


def _seal(directory: Path) -> None:
    """Rewrite COMPLETE.json for the directory's current files, as an attacker who planted them would."""
    files = {f.name: {"size": f.stat().st_size, "sha256": file_sha256(f)}
             for f in sorted(directory.iterdir()) if f.is_file() and f.name != ckpt.MARKER}
    step = json.loads((directory / ckpt.MARKER).read_text())["step"]
    (directory / ckpt.MARKER).write_text(json.dumps({"step": step, "files": files}))


def _plant(good: Path, where: Path, name: str, data: bytes, file: str = ".metadata") -> Path:
    """A copy of checkpoint ``good`` at ``where`` (a run directory) with ``file`` replaced by ``data``."""
    target = where / "checkpoints" / good.name
    shutil.rmtree(where, ignore_errors=True)
    shutil.copytree(good, target)
    (target / file).write_bytes(data)
    _seal(target)
    ckpt.verify(target)
    return target


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hostile")
    return tiny_run(root, [{"path": str(FEO), "dataset": "mp_pbeu"},
                           {"path": str(oxides_slice(root, 8)), "dataset": "oxides_pbe"}], steps=2)


def test_payloads_are_live_under_a_plain_unpickler(tmp_path):
    """Without this the refusals below could pass against payloads that never worked."""
    for name, data in metadata_payloads(f"touch {tmp_path}/ran").items():
        try:
            pickle.loads(data)
        except Exception:  # noqa: BLE001 - some payloads fail after their call has run
            pass
        assert (tmp_path / "ran").exists(), f"payload {name} does not run its command under pickle.loads"
        (tmp_path / "ran").unlink()


def test_every_metadata_payload_is_refused_by_the_reader(run, tmp_path):
    marker = tmp_path / "ran"
    for name, data in metadata_payloads(f"touch {marker}").items():
        planted = _plant(run["checkpoint"], tmp_path / name, name, data)
        with pytest.raises(ckpt.CheckpointError, match=r"\.metadata: refused") as err:
            ckpt.read_metadata(planted)
        assert "\n" not in str(err.value)
        assert not marker.exists(), f"payload {name} ran"


def test_the_genuine_metadata_still_loads_and_only_exact_names_resolve(run):
    md = ckpt.read_metadata(run["checkpoint"])
    assert md.state_dict_metadata and all(type(v).__name__ == "TensorStorageMetadata"
                                          for v in md.state_dict_metadata.values())
    for module, name in [(FS_MOD, "os"), (MD_MOD, "Metadata.__class__"), ("torch", "load"), ("torch", "float32.x"),
                         ("builtins", "eval"), ("os", "system"), ("posix", "system"), ("torch", "Size.__new__")]:
        with pytest.raises(pickle.UnpicklingError, match="not a checkpoint metadata type"):
            ckpt._MetadataUnpickler(io.BytesIO(b"")).find_class(module, name)


def test_python_312_enum_pickling_is_read_but_getattr_admits_nothing_else(run):
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    getattr_ = ckpt._MetadataUnpickler(io.BytesIO(b"")).find_class("builtins", "getattr")
    assert getattr_(_MEM_FORMAT_ENCODING, "TORCH_CONTIGUOUS_FORMAT") is _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT
    for obj, attr in [(_MEM_FORMAT_ENCODING, "__class__"), (torch.serialization._get_layout, "__globals__"),
                      (ckpt, "os")]:
        with pytest.raises(pickle.UnpicklingError, match="not allowed"):
            getattr_(obj, attr)


def test_tampering_with_the_allowed_classes_is_undone_and_refused(run, tmp_path):
    from torch.distributed.checkpoint.metadata import Metadata

    # BUILD with slot state on the class object itself: setattr(Metadata, "__eq__", PosixPath)
    body = _global(MD_MOD, "Metadata") + b"N}" + _s("__eq__") + _global("pathlib", "PosixPath") + b"s\x86b"
    planted = _plant(run["checkpoint"], tmp_path / "tamper", "tamper", _pickle(body))
    before = Metadata.__eq__
    with pytest.raises(ckpt.CheckpointError, match="modifies the metadata classes"):
        ckpt.read_metadata(planted)
    assert Metadata.__eq__ is before
    # the same on pathlib.PosixPath, a class of the whole process
    body = _global("pathlib", "PosixPath") + b"N}" + _s("drive") + _global("torch", "float32") + b"s\x86b"
    planted = _plant(run["checkpoint"], tmp_path / "tamper2", "tamper", _pickle(body))
    with pytest.raises(ckpt.CheckpointError, match="modifies the metadata classes"):
        ckpt.read_metadata(planted)
    assert Path("/a").drive == ""


def test_tensor_entries_outside_the_directory_are_refused(run, tmp_path):
    md = ckpt.read_metadata(run["checkpoint"])
    (tmp_path / "outside.distcp").write_bytes(b"")
    for info in md.storage_data.values():
        info.relative_path = "../../outside.distcp"
    planted = _plant(run["checkpoint"], tmp_path / "run", "escape", pickle.dumps(md))
    with pytest.raises(ckpt.CheckpointError, match="not a shard file of this directory"):
        ckpt.read_metadata(planted)


def test_a_hostile_tensor_shard_is_refused_by_torchs_weights_only_reader(run, tmp_path):
    """DCP reads each tensor record with ``torch.load(weights_only=True)``: a planted ``__reduce__`` in a shard
    file is refused, as one CheckpointError line from :func:`checkpoint.load`."""
    marker = tmp_path / "ran"
    good = run["checkpoint"]
    shard = next(f.name for f in good.iterdir() if f.suffix == ".distcp")
    md = ckpt.read_metadata(good)
    buffer = io.BytesIO()
    torch.save({"x": _Reduce(f"touch {marker}")}, buffer)
    evil = buffer.getvalue()
    # every tensor record of the shard now starts with the hostile torch.save archive
    data = bytearray((good / shard).read_bytes())
    for info in md.storage_data.values():
        if info.relative_path == shard and info.length >= len(evil):
            data[info.offset : info.offset + len(evil)] = evil
            info.length = len(evil)
    planted = _plant(good, tmp_path / "run", "shard", bytes(data), file=shard)
    (planted / ".metadata").write_bytes(pickle.dumps(md))
    _seal(planted)
    from lampretrain.inference.loading import load_model

    with pytest.raises(ckpt.CheckpointError, match="cannot be loaded") as err:
        load_model(planted)
    assert "\n" not in str(err.value) and "Weights only load failed" in str(err.value)
    assert not marker.exists()


def test_a_hostile_model_file_is_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"config": {}, "state_dict": _Reduce(f"touch {marker}")}, tmp_path / "model.pt")
    from lampretrain.finetune.property import PropertyModel
    from lampretrain.inference import Calculator
    from lampretrain.model_files import ModelFileError

    with pytest.raises(ModelFileError, match="model.pt: refused, not a plain tensor file .*Weights only load failed"):
        Calculator(str(tmp_path / "model.pt"))
    with pytest.raises(ModelFileError, match="refused"):
        PropertyModel.load(tmp_path / "model.pt")
    assert cli.main(["evaluate", str(tmp_path / "model.pt"), str(tmp_path)]) == 2
    assert not marker.exists()


def _entry_points(run: dict, planted_run: Path, tmp: Path) -> dict[str, list[str]]:
    """Every command that reads a checkpoint, pointed at the planted run directory or its checkpoint."""
    step_dir = str(next((planted_run / "checkpoints").iterdir()))
    recipe = dict(run["recipe"], output=str(planted_run))
    (tmp / "pretrain.yaml").write_text(yaml.safe_dump(recipe))
    (tmp / "finetune.yaml").write_text(yaml.safe_dump({
        "name": "ft", "output": str(tmp / "ft"), "data": {"store": str(run["store"]), "budget": 64, "datasets": ["mp_pbeu"]},
        "train": {"steps": 1, "progress": False}, "tracking": {"enabled": False}}))
    return {
        "evaluate": ["evaluate", step_dir, str(run["store"]), "--out", str(tmp / "eval")],
        "change-bias": ["change-bias", step_dir, str(run["store"]), "--out", str(tmp / "refit.pt")],
        "export": ["export", step_dir, str(tmp / "m.pt2"), "--dataset", "mp_pbeu"],
        "pretrain --resume DIR": ["pretrain", str(tmp / "pretrain.yaml"), "--resume", step_dir],
        "pretrain --resume auto": ["pretrain", str(tmp / "pretrain.yaml"), "--resume", "auto"],
        "finetune --from": ["finetune", str(tmp / "finetune.yaml"), "--from", str(planted_run)],
    }


@pytest.mark.parametrize("payload", ["getattr_gadget", "dotted_os_system", "reduce_object"])
def test_no_entry_point_runs_a_planted_checkpoint(run, tmp_path, capsys, payload):
    marker = tmp_path / "ran"
    planted_run = tmp_path / "planted"
    _plant(run["checkpoint"], planted_run, payload, metadata_payloads(f"touch {marker}")[payload])
    for name, argv in _entry_points(run, planted_run, tmp_path).items():
        code = cli.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, f"{name}: exit {code}"
        assert len(err) == 1 and err[0].startswith("error: ") and "refused" in err[0], f"{name}: {err}"
        assert not marker.exists(), f"{name} ran the planted command"
