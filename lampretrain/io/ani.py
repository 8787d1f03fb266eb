"""ANI-1x / ANI-1ccx HDF5: one group per formula, one row per conformer, several levels of theory.

Source units and conversions
----------------------------
* ``coordinates``: Å (kept).
* ``<method>.energy``: hartree → eV (× HARTREE_TO_EV).
* ``<method>.forces``: hartree/Å, already forces (−gradient) → × HARTREE_TO_EV.
* A NaN in the chosen energy or forces means "not computed at this level" (e.g. ``ccsd(t)_cbs.energy``
  exists only for part of the conformers): that label becomes ``None`` and its name is listed in
  ``info["missing"]``, so the loss masks it instead of prep dropping the structure.
Choose the level with ``method`` (default ``"wb97x_dz"``, ωB97x/6-31G(d)); ``energy_key`` /
``forces_key`` override the dataset names.  A group without the energy dataset is a ReadError.
Molecules: ``cell=None, pbc=False``, charge 0 (ANI-1x holds neutral closed-shell molecules).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lampretrain.frames import HARTREE_TO_EV, Frame
from lampretrain.io.errors import ErrorHandler, ReadError, report, source_id
from lampretrain.io.hdf5 import conformer_arrays, layout_groups, open_hdf5


def read_ani_hdf5(
    path: str | Path,
    *,
    dataset: str = "",
    level_of_theory: str = "",
    on_error: ErrorHandler = None,
    method: str = "wb97x_dz",
    energy_key: str | None = None,
    forces_key: str | None = None,
) -> Iterator[Frame]:
    """Frames of every conformer in an ANI-1x-layout HDF5 file at level ``method``."""
    energy_key = energy_key or f"{method}.energy"
    forces_key = forces_key or f"{method}.forces"
    try:
        h5 = open_hdf5(path)
    except ReadError as exc:
        report(on_error, exc)
        return
    with h5:
        expected = f"an ANI-1x group has 'atomic_numbers', 'coordinates' and {energy_key!r}"
        for name in layout_groups(h5, ("atomic_numbers", "coordinates"), path, on_error, expected):
            g = h5[name or "/"]
            try:
                numbers, positions, energy, forces = conformer_arrays(
                    g, path, name, "coordinates", energy_key, forces_key, 1.0, HARTREE_TO_EV, HARTREE_TO_EV
                )
                nconf = len(positions)
            except ReadError as exc:
                report(on_error, exc)
                continue
            except (OSError, KeyError, ValueError) as exc:  # a damaged HDF5 dataset
                report(on_error, ReadError(f"unreadable group: {exc}", path, name))
                continue
            energy_ok = np.isfinite(energy)
            forces_ok = np.isfinite(forces).all(axis=(1, 2)) if forces is not None else None
            for k in range(nconf):
                missing = [] if energy_ok[k] else ["energy"]
                if forces_ok is not None and not forces_ok[k]:
                    missing.append("forces")
                info: dict = {"method": method}
                if missing:
                    info["missing"] = missing
                frame = Frame(
                    positions=positions[k],
                    numbers=numbers,
                    energy=energy[k] if energy_ok[k] else None,
                    forces=forces[k] if forces_ok is not None and forces_ok[k] else None,
                    charge=0.0,
                    dataset=dataset,
                    level_of_theory=level_of_theory,
                    source=source_id(path, f"{name}/{k}"),
                    info=info,
                )
                named = {"energy": energy_key, "forces": forces_key, "charge": "neutral (ANI-1x)"}
                frame.label_keys = {label: key for label, key in named.items() if getattr(frame, label) is not None}
                yield frame
