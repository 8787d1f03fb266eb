"""Sharded, atomic, verifiable training checkpoints with torch.distributed.checkpoint (DCP).

Layout under ``<run>/checkpoints``::

    step-000000200/        a complete checkpoint
        __0_0.distcp ...   tensor shards written by every rank (DCP)
        .metadata          DCP's index of the shards
        meta.json          step, sampler position, MLflow run id, resolved recipe, optimizer hyper-parameters
        COMPLETE.json      written last: size and SHA-256 of every file above
    .step-000000300.tmp/   being written (never picked)

Atomic: every rank writes into the temporary directory; rank 0 then writes
``COMPLETE.json`` and renames the directory, so a checkpoint either has its
marker and all its files or is not a checkpoint. ``latest`` walks back from
the newest and skips one whose files do not match its marker (a truncated or
corrupted file), naming the reason.

Safe loading: only tensors are stored (read by DCP with
``torch.load(weights_only=True)``); DCP's ``.metadata`` index is a pickle,
read here by an unpickler that admits only DCP's own metadata classes and
builtins, so a checkpoint from an untrusted source cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

MARKER = "COMPLETE.json"
META = "meta.json"
PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory and the reason."""


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP metadata dataclasses, torch sizes/dtypes and builtins only."""

    ALLOWED_MODULES = (
        "torch.distributed.checkpoint.metadata",
        "torch.distributed.checkpoint.filesystem",
        "torch.distributed.checkpoint.planner",
    )
    ALLOWED = {
        ("torch", "Size"),
        ("torch", "float32"), ("torch", "float64"), ("torch", "float16"), ("torch", "bfloat16"),
        ("torch", "int64"), ("torch", "int32"), ("torch", "int16"), ("torch", "int8"), ("torch", "uint8"),
        ("torch", "bool"), ("torch", "complex64"), ("torch", "complex128"),
        ("torch", "contiguous_format"), ("torch", "channels_last"), ("torch", "preserve_format"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
        ("builtins", "getattr"),
    }

    def find_class(self, module: str, name: str):
        if module in self.ALLOWED_MODULES or (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any):
        path = Path(self.path) / ".metadata"
        with open(path, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _TensorOnlyLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        raise CheckpointError(f"checkpoint holds a non-tensor item '{read_item.dest_index.fqn}'; refusing to unpickle it")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoints (named ``step-N``), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(PREFIX) and path.name[len(PREFIX) :].isdigit():
            found.append((int(path.name[len(PREFIX) :]), path))
    return sorted(found)


def verify(path: Path, hashes: bool = True) -> None:
    """Raise :class:`CheckpointError` unless ``path`` has its marker and every file matches it."""
    marker = path / MARKER
    if not marker.exists():
        raise CheckpointError(f"{path}: no {MARKER} (incomplete checkpoint)")
    try:
        listed = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{path}/{MARKER}: unreadable ({err})") from None
    for name, entry in listed.items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"{path}: file {name} is missing")
        if f.stat().st_size != entry["size"]:
            raise CheckpointError(f"{path}: file {name} has {f.stat().st_size} bytes, marker says {entry['size']}")
        if hashes and _sha256(f) != entry["sha256"]:
            raise CheckpointError(f"{path}: file {name} does not match its SHA-256 (corrupted)")


def latest(root: str | Path, hashes: bool = True) -> Path | None:
    """The newest checkpoint that verifies; broken newer ones are skipped with a warning naming why."""
    for _, path in reversed(checkpoint_dirs(root)):
        try:
            verify(path, hashes)
            return path
        except CheckpointError as err:
            warnings.warn(f"skipping checkpoint: {err}", RuntimeWarning, stacklevel=2)
    return None


def save(root: str | Path, step: int, tensors: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` collectively (every rank calls this); returns its directory."""
    root = Path(root)
    rank = dist.get_rank()
    final = root / f"{PREFIX}{step:09d}"
    tmp = root / f".{final.name}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    dcp.save(tensors, storage_writer=FileSystemWriter(tmp, sync_files=True))
    dist.barrier()
    if rank == 0:
        (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
        files = {
            f.name: {"size": f.stat().st_size, "sha256": _sha256(f)}
            for f in sorted(tmp.iterdir())
            if f.is_file() and f.name != MARKER
        }
        with open(tmp / MARKER, "w") as fh:
            json.dump({"step": step, "files": files}, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # a re-run reaching the same step replaces it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for _, old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / META).read_text())


def load(path: Path, tensors: dict[str, Any], sparse: str | None = None) -> None:
    """Fill ``tensors`` (the same structure :func:`save` got, freshly built) in place from ``path``.

    ``sparse`` names a {name: {key: tensor}} entry (the optimizer state per parameter) whose names may be
    absent from the checkpoint: AdamW has no state for a parameter that has not had a gradient yet (MatRIS's
    last bond update never reaches the loss), while a fresh template has state for all. Those names are
    dropped from ``tensors``, so they stay stateless, as in the uninterrupted run.
    """
    if sparse is not None:
        saved = SafeFileSystemReader(path).read_metadata().state_dict_metadata
        entries = tensors[sparse]
        for name in list(entries):
            present = [f"{sparse}.{name}.{key}" in saved for key in entries[name]]
            if not any(present):
                del entries[name]
            elif not all(present):
                raise CheckpointError(f"{path}: {sparse} state of '{name}' is only partly saved")
    dcp.load(tensors, storage_reader=SafeFileSystemReader(path), planner=_TensorOnlyLoadPlanner())
