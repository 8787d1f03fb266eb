"""Stage 1 of prep, run in parallel: one input task → one encoded part file.

A task reads its input, validates every frame, computes the content hash and
the graph counts the index needs, and encodes the frame. It writes
``<work>/parts/<task>.records`` (concatenated records) and then
``<task>.meta`` (msgpack: per-frame metadata, skipped records with reasons).
The meta file is renamed into place last, so its presence means the task is
complete and a resumed prep skips it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from ..files import atomic_write_bytes
from ..frames import Frame, FrameError
from ..neighbors import NeighborList, graph_counts, neighbor_list
from ..store.codec import encode_frame


@dataclass(frozen=True)
class Task:
    """One unit of parallel work: a file (or directory) read by one reader."""

    number: int
    path: str
    source: int  # index of the SourceSpec
    dataset: str
    level_of_theory: str
    format: str | None
    options: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Settings:
    cutoff: float
    three_body_cutoff: float
    min_distance: float
    group_by: str | None


def part_paths(work: Path, task: Task) -> tuple[Path, Path]:
    stem = work / "parts" / f"{task.number:06d}"
    return stem.with_suffix(".records"), stem.with_suffix(".meta")


# Labels the census counts: present or not, and under which source key (Frame.label_keys).
CENSUS_LABELS = ("energy", "forces", "stress", "magmoms", "charge", "spin")


def label_sources(frame: Frame) -> dict[str, str]:
    """label → the key it came from, for each label the frame has (a reader that names none: "unnamed")."""
    return {
        label: frame.label_keys.get(label, "unnamed") for label in CENSUS_LABELS if getattr(frame, label) is not None
    }


def frame_meta(frame: Frame, nl: NeighborList, settings: Settings) -> dict[str, Any]:
    """What the index and the statistics need, so stage 2 never re-reads a record."""
    n_edges, n_angles = graph_counts(nl, frame.natoms, settings.cutoff, settings.three_body_cutoff)
    comp = frame.composition()
    group = frame.info.get(settings.group_by) if settings.group_by else None
    return {
        "hash": frame.content_hash(),
        "group": None if group is None else str(group),
        "natoms": frame.natoms,
        "n_edges": n_edges,
        "n_angles": n_angles,
        "z": list(comp),
        "count": list(comp.values()),
        "energy": frame.energy,
        "force_sq": None if frame.forces is None else float(np.square(frame.forces).sum()),
        "labels": [frame.energy is not None, frame.forces is not None, frame.stress is not None, frame.magmoms is not None],
        "source": frame.source,
    }


def checked_neighbors(frame: Frame, settings: Settings) -> NeighborList:
    """Frame.validate plus the too-close check; returns the neighbor list the index counts come from.

    One list at the larger cutoff serves both (vesin is slow at tiny cutoffs: its cell grid explodes).
    """
    frame.validate()
    nl = neighbor_list(
        frame.positions, frame.cell, frame.pbc, max(settings.cutoff, settings.three_body_cutoff), sort=False
    )
    if nl.n_edges and nl.distances.min() < settings.min_distance:
        closest = nl.distances.min()
        raise FrameError(f"two atoms are {closest:.4f} Å apart (< {settings.min_distance} Å)", "positions", frame.source)
    return nl


def run_task(task: Task, work: str, settings: Settings) -> dict[str, int]:
    """Convert one input; returns counts for the progress report."""
    from ..io import ReadError, ReadWarning, read_frames

    records_path, meta_path = part_paths(Path(work), task)
    if meta_path.exists():
        return {"done": 1, "resumed": 1}
    skipped: list[dict[str, str]] = []
    warnings: list[dict[str, Any]] = []
    frames_meta: list[dict[str, Any]] = []
    key_sets: dict[tuple, int] = {}  # each distinct label_sources() once; frames point into it

    def on_error(err: ReadError) -> None:
        where = getattr(err, "source", None) or task.path
        if isinstance(err, ReadWarning):
            warnings.append({"source": where, "keys": err.keys, "reason": str(err)})
        else:
            skipped.append({"source": where, "kind": "read_error", "reason": str(err)})

    records_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_records = records_path.with_name(f".{records_path.name}.tmp-{os.getpid()}")
    offset = 0
    frames_in = 0
    with open(tmp_records, "wb") as out:
        try:
            frames = read_frames(
                task.path,
                format=task.format,
                dataset=task.dataset,
                level_of_theory=task.level_of_theory,
                on_error=on_error,
                **dict(task.options),
            )
            for frame in frames:
                frames_in += 1
                try:
                    nl = checked_neighbors(frame, settings)
                    meta = frame_meta(frame, nl, settings)
                    data = encode_frame(frame)
                except FrameError as err:
                    skipped.append({"source": frame.source, "kind": "invalid", "reason": str(err)})
                    continue
                sources = tuple(sorted(label_sources(frame).items()))
                meta.update(offset=offset, length=len(data), keys=key_sets.setdefault(sources, len(key_sets)))
                out.write(data)
                offset += len(data)
                frames_meta.append(meta)
        except ReadError as err:  # the reader could not continue past this point
            on_error(err)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp_records, records_path)
    meta_blob = msgpack.packb(
        {"frames": frames_meta, "skipped": skipped, "warnings": warnings, "frames_read": frames_in,
         "key_sets": [dict(sources) for sources in key_sets]},
        use_bin_type=True,
    )
    atomic_write_bytes(meta_path, meta_blob)
    return {"done": 1, "frames": len(frames_meta), "skipped": len(skipped)}


def load_meta(work: Path, task: Task) -> dict[str, Any]:
    _, meta_path = part_paths(work, task)
    return msgpack.unpackb(meta_path.read_bytes(), raw=False, strict_map_key=True)
