"""``prepare(spec)``: raw files → LMDB and WebDataset shards + index + statistics + report.

Stages (each resumable, each write atomic):
 1. convert  — parallel, one task per input file: read, validate, hash, count, encode (prep/convert.py)
 2. plan     — dedup, deterministic split and shard assignment (prep/assemble.py)
 3. shards   — parallel, one job per shard and format (prep/shards.py)
 4. finalise — index columns, stats.json, report.json, then manifest.json last

A killed job re-run with the same spec skips finished tasks and shards and
produces byte-identical output; the work directory is removed once the
manifest is written (and by the next run, when a kill struck during that removal).
"""

from __future__ import annotations

import glob
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError, to_dict
from ..files import atomic_save_npy, atomic_write_json
from ..store.index import SPLITS, STORE_SCHEMA, STORE_VERSION, shard_name
from .assemble import index_columns, plan_store
from .convert import CENSUS_LABELS, Settings, Task, load_meta, part_paths, run_task
from .executor import run_parallel
from .shards import ShardJob, write_shard
from .spec import PrepSpec, SourceSpec
from .stats import dataset_stats


def expand_tasks(spec: PrepSpec) -> list[Task]:
    """One task per input (per ``include`` match), in spec order; fails before work on a missing path."""
    tasks = []
    for s, source in enumerate(spec.sources):
        root = Path(source.path)
        if not root.exists():
            raise ConfigError(f"sources[{s}].path: '{source.path}' does not exist")
        paths = sorted(glob.glob(str(root / source.include))) if source.include else [str(root)]
        if not paths:
            raise ConfigError(f"sources[{s}].include: '{source.include}' matches nothing under {source.path}")
        for path in paths:
            tasks.append(
                Task(
                    number=len(tasks),
                    path=path,
                    source=s,
                    dataset=source.dataset,
                    level_of_theory=source.level_of_theory,
                    format=source.format,
                    options=tuple(sorted({**source.options, **_label_options(source)}.items())),
                )
            )
    return tasks


def _label_options(source: SourceSpec) -> dict[str, Any]:
    """The reader options of a source's ``keys:`` and ``ignore:`` (only when given, so other readers never see them)."""
    options: dict[str, Any] = {}
    if source.keys.mapped():
        options["keys"] = source.keys.mapped()
    if source.ignore:
        options["ignore"] = list(source.ignore)
    return options


def spec_digest(spec: PrepSpec) -> str:
    return hashlib.sha256(json.dumps(to_dict(spec), sort_keys=True).encode()).hexdigest()


def _claim_work_dir(out: Path, spec: PrepSpec) -> Path:
    """The work dir for this spec; refuses to mix output from a different spec."""
    work = out / ".work"
    digest = spec_digest(spec)
    marker = work / "spec.sha256"
    if marker.exists() and marker.read_text() != digest:
        raise ConfigError(
            f"{out}: holds an unfinished prep of a different spec; delete {work} (or the output) to start over"
        )
    work.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        marker.write_text(digest)
    for stale in out.rglob("*.tmp-*"):  # left by writers of a killed run; finished files were renamed
        stale.unlink()
    return work


def prepare(
    spec: PrepSpec,
    workers: int | None = None,
    ray_address: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run prep; returns the report (also written to ``<output>/report.json``)."""
    out = Path(spec.output)
    if (out / "manifest.json").exists():
        if not overwrite:
            # The manifest is written last, so the store is complete; a work dir beside it is what a kill
            # during the final clean-up left (a second copy of every encoded record): finish removing it.
            if (out / ".work").exists():
                shutil.rmtree(out / ".work")
            return json.loads((out / "report.json").read_text())
        shutil.rmtree(out)
    tasks = expand_tasks(spec)
    work = _claim_work_dir(out, spec)
    settings = Settings(spec.cutoff, spec.three_body_cutoff, spec.min_distance, spec.split.group_by)
    started = time.perf_counter()

    jobs = [(task, str(work), settings) for task in tasks]
    run_parallel(run_task, jobs, workers, ray_address, desc="convert", progress=progress)

    datasets = list(dict.fromkeys(source.dataset for source in spec.sources))
    dataset_id = {name: k for k, name in enumerate(datasets)}
    metas, skipped, warnings, frames_read, key_sets = [], [], [], 0, {}
    for task in tasks:
        part = load_meta(work, task)
        frames_read += part["frames_read"]
        skipped += part["skipped"]
        warnings += part["warnings"]
        key_sets[task.number] = part["key_sets"]
        metas += [(task.number, dataset_id[task.dataset], m) for m in part["frames"]]
    plan = plan_store(metas, spec.split, spec.dedup, int(spec.shard_size_mb * 2**20))
    skipped += plan.duplicates

    shard_jobs = []
    for shard in plan.shards:
        members = plan.records[slice(*shard["rows"])]
        pieces = [(str(part_paths(work, tasks[p.task])[0]), p.meta["offset"], p.meta["length"]) for p in members]
        for fmt in spec.formats:
            path = out / shard_name(shard["split"], shard["shard"], fmt)
            shard_jobs.append((ShardJob(fmt, str(path), shard["rows"][0], tuple(pieces)),))
    checksums = run_parallel(write_shard, shard_jobs, workers, ray_address, desc="shards", progress=progress)

    columns = index_columns(plan)
    for name, array in columns.items():
        atomic_save_npy(out / "index" / f"{name}.npy", array)
    stats = _stats(plan, datasets)
    atomic_write_json(out / "stats.json", stats)
    report = {
        "frames_in": frames_read,
        "written": len(plan.records),
        "skipped": {kind: sum(s["kind"] == kind for s in skipped) for kind in ("invalid", "duplicate", "read_error")},
        "skipped_records": skipped,
        "per_split": {split: int((columns["split"] == k).sum()) for k, split in enumerate(SPLITS)},
        "per_dataset": {name: int((columns["dataset"] == k).sum()) for k, name in enumerate(datasets)},
        "labels": label_census(plan, datasets, key_sets),
        "warnings": warnings,
        "seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write_json(out / "report.json", report)
    shards_by_format: dict[str, list[dict[str, Any]]] = {fmt: [] for fmt in spec.formats}
    for (job,), digest in zip(shard_jobs, checksums):
        rows = len(job.pieces)
        shards_by_format[job.format].append(
            {"path": str(Path(job.path).relative_to(out)), "split": Path(job.path).stem.split("-")[0], "rows": rows,
             "first_row": job.first_row, "sha256": digest}
        )
    manifest = {
        "schema": STORE_SCHEMA,
        "version": STORE_VERSION,
        "name": spec.name,
        "datasets": datasets,
        "levels_of_theory": {s.dataset: s.level_of_theory for s in spec.sources},
        "cutoff": spec.cutoff,
        "three_body_cutoff": spec.three_body_cutoff,
        "rows": len(plan.records),
        "shards": shards_by_format,
        "spec": to_dict(spec),
        "spec_sha256": spec_digest(spec),
        "origin": to_dict(spec.origin),
    }
    atomic_write_json(out / "manifest.json", manifest)
    shutil.rmtree(work)
    return report


def _stats(plan, datasets: list[str]) -> dict[str, Any]:
    """Statistics per dataset over its training records."""
    result = {}
    for k, name in enumerate(datasets):
        train = [p.meta for p in plan.records if p.dataset == k and p.split == 0]
        if not train:
            continue
        result[name] = dataset_stats(
            [m["z"] for m in train],
            [m["count"] for m in train],
            [m["energy"] for m in train],
            np.array([m["natoms"] for m in train]),
            np.array([m["n_edges"] for m in train]),
            [m["force_sq"] for m in train],
        )
    return result


def label_census(plan, datasets: list[str], key_sets: dict[int, list[dict[str, str]]]) -> dict[str, Any]:
    """Per dataset, over the written frames: how many carry each label, and from which source keys."""
    census: dict[str, Any] = {
        name: {"frames": 0, **{label: {"frames": 0, "keys": {}} for label in CENSUS_LABELS}} for name in datasets
    }
    for record in plan.records:
        entry = census[datasets[record.dataset]]
        entry["frames"] += 1
        for label, key in key_sets[record.task][record.meta["keys"]].items():
            entry[label]["frames"] += 1
            entry[label]["keys"][key] = entry[label]["keys"].get(key, 0) + 1
    return census


def census_lines(report: dict[str, Any]) -> list[str]:
    """The census as text: first one line per dataset with no forces at all, then a line per dataset."""
    census = report.get("labels", {})
    lines = [
        f"WARNING: dataset {name} has forces on 0 % of its {c['frames']} frames (energies only)"
        for name, c in census.items() if c["frames"] and c["forces"]["frames"] == 0
    ]
    for name, c in census.items():
        parts = []
        for label in CENSUS_LABELS:
            count = c[label]["frames"]
            if count:
                keys = ", ".join(c[label]["keys"])
                parts.append(f"{label} {100 * count / c['frames']:.0f} % ({keys})")
        lines.append(f"  {name}: {c['frames']} frames; " + ("; ".join(parts) or "no labels"))
    return lines
