"""The prep spec: one YAML file describing which raw files become which store.

Example (``data_prep/*.yaml`` hold one per public source)::

    name: mptrj
    output: stores/mptrj
    sources:
      - path: raw/MPtrj_2022.9_full.json
        format: mptrj
        dataset: mptrj
        level_of_theory: PBE/PBE+U
        options: {energy_key: uncorrected_total_energy}
      - path: raw/fitting_set.extxyz
        dataset: my_pbe
        keys: {energy: DFT_energy, forces: force, virial: virial}   # names in the file
        ignore: [REF_charges]                                       # label-like keys left out on purpose
    split: {val: 0.05, group_by: mp_id}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import ConfigError, from_dict, load_yaml, to_dict


@dataclass
class LabelKeys:
    """Where a source keeps each label, when not where its reader looks (``lampretrain.io.labels``).

    Per-atom labels (forces, magmoms) name a per-atom array (extxyz ``Properties``), the others a
    per-frame value (extxyz comment line, ASE db key, an entry's ``data``); values in eV, Å, eV/Å,
    stress eV/Å³ with ASE's sign, a virial in eV (σ = −W / V).  Read by the ASE formats (extxyz,
    ``ase``, ``ase_db``, ``aselmdb``) and by ``pymatgen_json`` entries.
    """

    energy: str | None = None
    forces: str | None = None
    stress: str | None = None
    virial: str | None = None
    magmoms: str | None = None
    charge: str | None = None
    spin: str | None = None

    def check(self) -> None:
        if self.stress and self.virial:
            raise ConfigError("map either stress or virial, not both (they are one label)")

    def mapped(self) -> dict[str, str]:
        return {label: key for label, key in to_dict(self).items() if key}


@dataclass
class SourceSpec:
    """One input: a file or directory, read by one reader."""

    path: str
    dataset: str  # name of the dataset (one head and one set of element references in training)
    level_of_theory: str = ""
    format: str | None = None  # a reader name from lampretrain.io.FORMATS; guessed when absent
    include: str | None = None  # glob under ``path``: each match is one parallel task
    options: dict[str, Any] = field(default_factory=dict)  # passed to the reader (method, energy_key, ...)
    keys: LabelKeys = field(default_factory=LabelKeys)  # label → name in the file
    ignore: list[str] = field(default_factory=list)  # label-like keys left out without a warning

    def check(self) -> None:
        from ..io import FORMATS, takes_option

        if self.format is not None and self.format not in FORMATS:
            raise ConfigError(f"format: unknown format '{self.format}'; known formats: {', '.join(sorted(FORMATS))}")
        if (self.keys.mapped() or self.ignore) and self.format is not None and not takes_option(self.format, "keys"):
            keyed = ", ".join(name for name in sorted(FORMATS) if takes_option(name, "keys"))
            raise ConfigError(f"keys: format '{self.format}' has fixed names; keys and ignore apply to {keyed}")
        if {"keys", "ignore"} & set(self.options):
            raise ConfigError("options: give keys and ignore as the source's own keys: and ignore: entries")
        if not self.dataset:
            raise ConfigError("dataset: must be a non-empty name")


@dataclass
class SplitSpec:
    """Deterministic split by content hash: a frame never moves between splits on a re-run."""

    val: float = 0.05
    test: float = 0.0
    group_by: str | None = None  # a Frame.info key (e.g. mp_id): frames sharing it land in one split
    salt: str = ""  # changes the assignment while keeping it deterministic

    def check(self) -> None:
        if not (0 <= self.val < 1 and 0 <= self.test < 1 and self.val + self.test < 1):
            raise ConfigError(f"val={self.val}, test={self.test}: fractions must be in [0, 1) with val + test < 1")


@dataclass
class OriginSpec:
    """Where a public source comes from; documentation carried into the manifest."""

    url: str = ""
    license: str = ""
    citation: str = ""
    units: str = ""  # units of the raw files (the reader converts to eV, Å)
    notes: str = ""


@dataclass
class PrepSpec:
    name: str
    output: str
    sources: list[SourceSpec]
    formats: list[Literal["lmdb", "wds"]] = field(default_factory=lambda: ["lmdb", "wds"])
    cutoff: float = 6.0  # Å, for the index's edge counts
    three_body_cutoff: float = 4.5  # Å, for the index's angle counts
    shard_size_mb: float = 256.0  # upper bound of one shard's record bytes
    dedup: bool = True
    min_distance: float = 0.1  # Å; closer atoms make a record bad
    split: SplitSpec = field(default_factory=SplitSpec)
    origin: OriginSpec = field(default_factory=OriginSpec)

    def check(self) -> None:
        if not self.sources:
            raise ConfigError("sources: at least one source is needed")
        if not self.formats:
            raise ConfigError("formats: choose at least one of 'lmdb', 'wds'")
        if self.three_body_cutoff > self.cutoff:
            raise ConfigError(f"three_body_cutoff {self.three_body_cutoff} exceeds cutoff {self.cutoff}")
        if not self.shard_size_mb > 0:
            raise ConfigError(f"shard_size_mb: must be > 0, got {self.shard_size_mb}")
        if not self.three_body_cutoff > 0:  # also bounds cutoff, which is at least as large
            raise ConfigError(f"three_body_cutoff: must be > 0 Å, got {self.three_body_cutoff}")
        if not self.min_distance >= 0:
            raise ConfigError(f"min_distance: must be >= 0 Å, got {self.min_distance}")


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None, base: str | Path | None = None) -> PrepSpec:
    """Read and validate a spec; relative source paths are relative to ``base`` (default: the working directory)."""
    data = load_yaml(path)
    data.update(overrides or {})
    if base is not None:
        data["sources"] = [s if not isinstance(s, dict) or Path(s.get("path", "")).is_absolute()
                           else {**s, "path": str(Path(base) / s["path"])} for s in data.get("sources") or []]
    return from_dict(PrepSpec, data, where=str(path))
