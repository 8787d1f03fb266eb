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

Safe loading, for checkpoints from anywhere: only tensors are stored, and DCP
reads them with ``torch.load(weights_only=True)``; a non-tensor entry is refused
(:class:`_TensorOnlyLoadPlanner`). DCP's ``.metadata`` index is a pickle; it is
read by :func:`read_metadata`, whose unpickler resolves an exact list of
(module, name) pairs to objects fixed in advance (DCP's metadata dataclasses,
torch sizes, dtypes and layouts), so no name in the file can reach a function
that runs code; the decoded index must then be tensor entries in shard files of
the same directory. ``meta.json`` and ``COMPLETE.json`` are JSON. A
``COMPLETE.json`` is a checksum against corruption, not a signature: a planted
checkpoint can have a valid one, which is why the readers above do not trust it.
"""

from __future__ import annotations

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

from ..errors import UserError, one_line
from ..files import file_sha256, fsync_dir

MARKER = "COMPLETE.json"
META = "meta.json"
PREFIX = "step-"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the directory and the reason."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """The path given as a checkpoint or run directory does not exist."""


def _exact_globals() -> dict[tuple[str, str], Any]:
    """Every global a DCP ``.metadata`` pickle may name, as exact (module, name) → object pairs.

    The objects are resolved here, once, by us: the unpickler never imports a module or walks an
    attribute path, so a dotted name (``os.system`` under an allowed module, pickle protocol 4) or a
    gadget such as ``builtins.getattr`` has nothing to resolve to. What remains callable from a
    pickle is harmless: dataclass and enum constructors, ``torch.Size``, ``PosixPath`` and torch's
    layout lookup by name.
    """
    import pathlib
    from collections import OrderedDict

    import torch
    import torch.distributed.checkpoint.filesystem as fs_mod
    import torch.distributed.checkpoint.metadata as md_mod
    from torch.serialization import _get_layout

    pairs: dict[tuple[str, str], Any] = {
        (md_mod.__name__, name): getattr(md_mod, name)
        for name in ("Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                     "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
    }
    pairs[(fs_mod.__name__, "_StorageInfo")] = fs_mod._StorageInfo
    pairs[("torch", "Size")] = torch.Size
    pairs[("torch.serialization", "_get_layout")] = _get_layout
    pairs.update({("torch", name): value for name, value in vars(torch).items()
                  if isinstance(value, (torch.dtype, torch.layout, torch.memory_format))})
    pairs[("collections", "OrderedDict")] = OrderedDict
    # the path a checkpoint was saved to; Python >= 3.13 pickles it from pathlib._local
    for module in ("pathlib", "pathlib._local"):
        pairs[(module, "PosixPath")] = pathlib.PosixPath
        pairs[(module, "PurePosixPath")] = pathlib.PurePosixPath
    # Python >= 3.12 pickles an enum member as getattr(EnumClass, "NAME"); only that use is admitted
    pairs[("builtins", "getattr")] = _enum_member
    return pairs


def _enum_member(cls: Any, name: Any) -> Any:
    """``getattr`` as Python 3.12+ pickles enum members: the member ``name`` of an allowed enum, nothing else."""
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    if cls is not _MEM_FORMAT_ENCODING or not isinstance(name, str) or name not in cls.__members__:
        raise pickle.UnpicklingError(f"checkpoint metadata asks for attribute {name!r} of {cls!r}, which is not allowed")
    return cls[name]


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the exact globals of :func:`_exact_globals`; anything else is refused by name."""

    GLOBALS = _exact_globals()

    def find_class(self, module: str, name: str):
        try:
            return self.GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which is not a checkpoint metadata type") from None

    def persistent_load(self, pid: Any):
        raise pickle.UnpicklingError("holds a persistent reference, which checkpoint metadata never has")


def _classes_state() -> dict[type, dict[str, Any]]:
    """The attributes of every allowed class (a pickle can BUILD on a class object as on an instance)."""
    return {obj: dict(vars(obj)) for obj in _MetadataUnpickler.GLOBALS.values() if isinstance(obj, type)}


def _restore_classes(before: dict[type, dict[str, Any]]) -> bool:
    """Undo attributes a pickle's BUILD set on an allowed class itself; True when there were any."""
    changed = False
    for cls, attrs in before.items():
        now = dict(vars(cls))
        for name in now.keys() - attrs.keys():
            delattr(cls, name)
            changed = True
        for name, value in attrs.items():
            if now.get(name, value) is not value and name not in ("__dict__", "__weakref__"):
                setattr(cls, name, value)
                changed = True
    return changed


def read_metadata(path: Path) -> Any:
    """DCP's index of checkpoint ``path``, checked to be nothing but tensor entries in its own shard files.

    Raises :class:`CheckpointError` naming the file for a pickle that names anything but the metadata
    types, tampers with them, or points a tensor outside the directory or into a file that is not there.
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

    where = path / ".metadata"
    before = _classes_state()
    try:
        with open(where, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
    except FileNotFoundError:
        raise CheckpointError(f"{where}: missing (not a torch.distributed.checkpoint directory)") from None
    except Exception as err:  # noqa: BLE001 - any failure to decode is a refusal, never a partial object
        raise CheckpointError(f"{where}: refused, {one_line(str(err))}") from None
    finally:
        tampered = _restore_classes(before)
    if tampered:
        raise CheckpointError(f"{where}: refused, the pickle modifies the metadata classes themselves")
    if type(metadata) is not Metadata:
        raise CheckpointError(f"{where}: refused, holds a {type(metadata).__name__}, not DCP Metadata")
    bad = [k for k, v in metadata.state_dict_metadata.items() if type(v) is not TensorStorageMetadata]
    if bad:
        raise CheckpointError(f"{where}: refused, entry '{bad[0]}' is not a tensor (only tensors are loaded)")
    present = {f.name for f in path.iterdir() if f.is_file()}
    for index, info in metadata.storage_data.items():
        if type(index) is not MetadataIndex or type(info) is not _StorageInfo:
            raise CheckpointError(f"{where}: refused, storage entry of type {type(info).__name__}")
        name = info.relative_path
        if not isinstance(name, str) or name not in present or name.startswith(".") or Path(name).name != name:
            raise CheckpointError(f"{where}: refused, tensor '{index.fqn}' points at {name!r}, "
                                  "not a shard file of this directory")
        if info.transform_descriptors:
            raise CheckpointError(f"{where}: refused, tensor '{index.fqn}' asks for stream transforms "
                                  f"{info.transform_descriptors}, which lampretrain never writes")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with :func:`read_metadata` in place of its unrestricted ``pickle.load``."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _TensorOnlyLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        raise CheckpointError(f"checkpoint holds a non-tensor item '{read_item.dest_index.fqn}'; refusing to unpickle it")


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
        if hashes and file_sha256(f) != entry["sha256"]:
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


def resolve(path: str | Path, hashes: bool = True) -> Path:
    """A checkpoint directory, a run's ``checkpoints`` folder or a run directory → the checkpoint to load.

    Raises :class:`CheckpointError` saying which of the three ``path`` is not, or why none of the
    checkpoints it holds can be used.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFound(f"{path}: no such checkpoint or run directory")
    if path.is_file() or (path / MARKER).exists():
        return path
    if (path / ".metadata").exists():
        raise CheckpointError(f"{path}: no {MARKER}, so its writer did not finish it (incomplete checkpoint)")
    roots = [r for r in (path, path / "checkpoints") if checkpoint_dirs(r)]
    if not roots:
        raise CheckpointError(f"{path}: neither a checkpoint directory (no {MARKER}) nor a run with step-N checkpoints")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all reasons go into the one error below
        found = latest(roots[0], hashes)
    if found is None:
        raise CheckpointError(f"{roots[0]}: no usable checkpoint ({unusable(roots[0], hashes)})")
    return found


def unusable(root: Path, hashes: bool = True) -> str:
    """Why each step-N directory under ``root`` fails :func:`verify`, newest first, as one line."""
    reasons = []
    for _, path in reversed(checkpoint_dirs(root)):
        try:
            verify(path, hashes)
        except CheckpointError as err:
            reasons.append(str(err).replace(f"{path}", path.name, 1))
    return "; ".join(reasons)


def set_aside(root: Path, paths: list[Path]) -> Path:
    """Move checkpoint directories out of the way, never deleting them: ``root/previous-<UTC time>/<name>``."""
    import time

    dest = root / time.strftime("previous-%Y%m%dT%H%M%SZ", time.gmtime())
    dest.mkdir(parents=True, exist_ok=True)
    for path in paths:
        os.rename(path, dest / path.name)
    fsync_dir(root)
    return dest


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
            f.name: {"size": f.stat().st_size, "sha256": file_sha256(f)}
            for f in sorted(tmp.iterdir())
            if f.is_file() and f.name != MARKER
        }
        with open(tmp / MARKER, "w") as fh:
            json.dump({"step": step, "files": files}, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final.exists():  # not written by this run (e.g. a corrupt one resume skipped): kept, never replaced
            moved = set_aside(root, [final])
            warnings.warn(f"{final} existed and was not written by this run; moved to {moved}", RuntimeWarning,
                          stacklevel=2)
        os.rename(tmp, final)
        fsync_dir(root)
        for _, old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def read_meta(path: Path) -> dict[str, Any]:
    """The checkpoint's ``meta.json`` (plain JSON: step, sampler position, resolved recipe, model config)."""
    try:
        return json.loads((path / META).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a lampretrain checkpoint (no {META})") from None
    except ValueError as err:
        raise CheckpointError(f"{path / META}: not valid JSON ({err})") from None


def load(path: Path, tensors: dict[str, Any], sparse: str | None = None) -> None:
    """Fill ``tensors`` (the same structure :func:`save` got, freshly built) in place from ``path``.

    ``sparse`` names a {name: {key: tensor}} entry (the optimizer state per parameter) whose names may be
    absent from the checkpoint: AdamW has no state for a parameter that has not had a gradient yet (MatRIS's
    last bond update never reaches the loss), while a fresh template has state for all. Those names are
    dropped from ``tensors``, so they stay stateless, as in the uninterrupted run.
    """
    if sparse is not None:
        saved = read_metadata(path).state_dict_metadata
        entries = tensors[sparse]
        for name in list(entries):
            present = [f"{sparse}.{name}.{key}" in saved for key in entries[name]]
            if not any(present):
                del entries[name]
            elif not all(present):
                raise CheckpointError(f"{path}: {sparse} state of '{name}' is only partly saved")
    try:
        # no_dist: outside a process group (evaluate, export, the calculator) this rank reads it all. torch
        # (2.13) still warns that it assumes a single process when told so, on every model load: that one
        # message is silenced, nothing else.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized, "
                                    "assuming the intent is to load in a single process", UserWarning)
            dcp.load(tensors, storage_reader=SafeFileSystemReader(path), planner=_TensorOnlyLoadPlanner(),
                     no_dist=not dist.is_initialized())
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # DCP's CheckpointException is a BaseException wrapping each rank's failure
        inner = _innermost(err)
        if isinstance(inner, CheckpointError):
            raise inner from None
        raise CheckpointError(f"{path}: cannot be loaded: {one_line(str(inner))[:400]}") from None


def _innermost(err: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's ``CheckpointException`` (itself otherwise)."""
    failures = getattr(err, "failures", None)  # {rank: (exception, stack summary)}
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        if isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException):
            return _innermost(inner[0])
    return err
