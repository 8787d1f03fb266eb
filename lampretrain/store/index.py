"""The store's index and manifest: what every record is, readable without opening a shard.

Layout of a store directory::

    manifest.json        schema/version, datasets, cutoffs, shards per format and split with checksums
    index/<column>.npy   one row per record in store order (split-major, then source order)
    stats.json           per-dataset statistics (element references, residual RMS, force RMS, ...)
    report.json          what prep read, wrote and skipped (with reasons)
    lmdb/<split>-NNNNN.lmdb, wds/<split>-NNNNN.tar

Columns are plain ``.npy`` files (no pickle, memory-mappable): samplers and the
load balancer read ``natoms``/``n_edges``/``n_angles`` for millions of frames
without touching shard data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError
from ..errors import UserError

STORE_SCHEMA = "lampretrain-store"
STORE_VERSION = 1
SPLITS = ("train", "val", "test")

# Bits of the ``labels`` column.
HAS_ENERGY, HAS_FORCES, HAS_STRESS, HAS_MAGMOMS = 1, 2, 4, 8

COLUMNS = {
    "split": np.uint8,  # index into SPLITS
    "shard": np.int32,  # shard number within its split
    "key": np.int64,  # record position inside the shard
    "natoms": np.int32,
    "n_edges": np.int64,  # directed edges within the cutoff
    "n_angles": np.int64,  # ordered bond pairs within the three-body cutoff
    "dataset": np.int16,  # index into manifest["datasets"]
    "labels": np.uint8,  # HAS_* bits
    "hash": "S32",  # content hash (hex), the dedup and split key
    "comp_ptr": np.int64,  # composition CSR row pointer, len = rows + 1
    "comp_z": np.uint8,
    "comp_count": np.int32,
}


def shard_name(split: str, shard: int, fmt: str) -> str:
    ext = {"lmdb": "lmdb", "wds": "tar"}[fmt]
    return f"{fmt}/{split}-{shard:05d}.{ext}"


class StoreError(UserError, FileNotFoundError):
    """A store directory that is missing, incomplete or of another version; the message names it and the fix."""


@dataclass(frozen=True)
class Selection:
    """The frames of one split chosen by dataset and size (:meth:`StoreIndex.select`), in store order."""

    split: str
    names: list[str]  # the chosen datasets in the order asked (head order); the store's order when none were named
    rows: np.ndarray  # store row ids
    heads: np.ndarray  # per row, the position of its dataset in ``names`` (the dataset id its graph batch carries)

    def __len__(self) -> int:
        return int(self.rows.size)


@dataclass
class StoreIndex:
    """A store's manifest plus its index columns (memory-mapped)."""

    root: Path
    manifest: dict[str, Any]
    columns: dict[str, np.ndarray]

    @classmethod
    def open(cls, root: str | Path) -> "StoreIndex":
        root = Path(root)
        manifest_path = root / "manifest.json"
        if not manifest_path.exists():
            raise StoreError(f"{root}: not a lampretrain store (no manifest.json); run `lampretrain prep` first")
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError as err:
            raise StoreError(f"{manifest_path}: not valid JSON ({err}); re-run `lampretrain prep`") from None
        if manifest.get("schema") != STORE_SCHEMA or manifest.get("version") != STORE_VERSION:
            raise StoreError(
                f"{manifest_path}: store schema {manifest.get('schema')} v{manifest.get('version')} "
                f"is not readable by this lampretrain (expects {STORE_SCHEMA} v{STORE_VERSION}); re-run prep"
            )
        columns = {
            name: np.load(root / "index" / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in COLUMNS
        }
        return cls(root, manifest, columns)

    def __len__(self) -> int:
        return int(self.columns["natoms"].shape[0])

    def __getattr__(self, name: str) -> np.ndarray:
        columns = self.__dict__.get("columns", {})
        if name in columns:
            return columns[name]
        raise AttributeError(name)

    @property
    def datasets(self) -> list[str]:
        return list(self.manifest["datasets"])

    @property
    def cutoff(self) -> float:
        return float(self.manifest["cutoff"])

    @property
    def three_body_cutoff(self) -> float:
        return float(self.manifest["three_body_cutoff"])

    def rows(self, split: str | None = None) -> np.ndarray:
        """Row ids of one split (all rows when None)."""
        if split is None:
            return np.arange(len(self))
        return np.nonzero(self.columns["split"] == SPLITS.index(split))[0]

    def select(
        self, split: str, datasets: list[str] | None = None, max_natoms: int | None = None, *,
        required: bool = True, key: str = "data",
    ) -> Selection:
        """The ``split`` frames of ``datasets`` (default: all of the store's) with at most ``max_natoms`` atoms.

        Every loader, check and evaluation of store frames selects through here, so they agree on which frames
        a recipe means. ``key`` is the recipe section the arguments came from, named by the errors: a dataset
        the store lacks, and (``required``) a selection left empty.
        """
        unknown = [n for n in datasets or [] if n not in self.datasets]
        if unknown:
            raise ConfigError(f"{key}.datasets: '{unknown[0]}' is not a dataset of {self.root}; it has "
                              f"{', '.join(self.datasets)}")
        names = list(self.datasets if datasets is None else datasets)
        split_rows = self.rows(split)
        head_of = np.full(len(self.datasets), -1, dtype=np.int64)
        head_of[[self.datasets.index(n) for n in names]] = np.arange(len(names))
        heads = head_of[self.columns["dataset"][split_rows]]
        keep = heads >= 0
        if max_natoms is not None:
            keep &= self.columns["natoms"][split_rows] <= max_natoms
        positions = np.nonzero(keep)[0]
        if required and positions.size == 0:
            raise ConfigError(f"{key}: {self.root} has no '{split}' frames of {', '.join(names) or 'no dataset'}"
                              + (f" with at most {max_natoms} atoms ({key}.max_natoms)" if max_natoms else ""))
        return Selection(split, names, split_rows[positions], heads[positions])

    def shard_paths(self, fmt: str, split: str) -> list[Path]:
        return [self.root / s["path"] for s in self.manifest["shards"][fmt] if s["split"] == split]

    def composition(self, row: int) -> dict[int, int]:
        a, b = self.columns["comp_ptr"][row], self.columns["comp_ptr"][row + 1]
        return {int(z): int(c) for z, c in zip(self.columns["comp_z"][a:b], self.columns["comp_count"][a:b])}

    def composition_matrix(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Dense (len(rows), n_elements) counts over the elements present, and those atomic numbers."""
        ptr = self.columns["comp_ptr"]
        starts, ends = ptr[rows], ptr[rows + 1]
        lengths = ends - starts
        flat = np.repeat(starts, lengths) + (np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths))
        z = self.columns["comp_z"][flat].astype(np.int64)
        elements = np.unique(z)
        matrix = np.zeros((len(rows), len(elements)))
        np.add.at(matrix, (np.repeat(np.arange(len(rows)), lengths), np.searchsorted(elements, z)), self.columns["comp_count"][flat])
        return matrix, elements

    def stats(self) -> dict[str, Any]:
        return json.loads((self.root / "stats.json").read_text())

    def report(self) -> dict[str, Any]:
        return json.loads((self.root / "report.json").read_text())
