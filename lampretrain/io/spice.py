"""SPICE HDF5: one group per molecule, one row per conformation.

Source units and conversions
----------------------------
* ``conformations``: bohr → Å (× BOHR_TO_ANGSTROM).
* ``dft_total_energy``: hartree → eV (× HARTREE_TO_EV).
* ``dft_total_gradient``: hartree/bohr, the gradient dE/dx → forces = −gradient × HARTREE_TO_EV / BOHR_TO_ANGSTROM.
* total charge: not stored; it is the sum of the formal charges in the group's ``smiles``
  (bracket atoms such as ``[Na+]``, ``[NH3+]``, ``[O-]``, ``[Fe+2]``, ``[O--]``), as SPICE defines it.
Molecules: ``cell=None, pbc=False``.  Values are passed on as stored (a NaN energy reaches
``Frame.validate``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lampretrain.frames import BOHR_TO_ANGSTROM, HARTREE_TO_EV, Frame
from lampretrain.io.errors import ErrorHandler, ReadError, report, source_id
from lampretrain.io.hdf5 import conformer_arrays, layout_groups, open_hdf5

_BRACKET_ATOM = re.compile(r"\[([^\]]*)\]")
_CHARGE = re.compile(r"(\++|-+)(\d*)$")


def smiles_formal_charge(smiles: str) -> int:
    """Sum of the formal charges written in the bracket atoms of a SMILES string (OpenSMILES §3.1.5)."""
    total = 0
    for atom in _BRACKET_ATOM.findall(smiles):
        atom = atom.split(":", 1)[0]  # drop an atom-map class such as ':12'
        match = _CHARGE.search(atom)
        if not match:
            continue
        signs, digits = match.groups()
        sign = 1 if signs[0] == "+" else -1
        total += sign * (int(digits) if digits else len(signs))
    return total


def _text(value) -> str:
    value = np.asarray(value).reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else str(value)


def read_spice_hdf5(
    path: str | Path,
    *,
    dataset: str = "",
    level_of_theory: str = "",
    on_error: ErrorHandler = None,
    energy_key: str = "dft_total_energy",
    gradient_key: str = "dft_total_gradient",
) -> Iterator[Frame]:
    """Frames of every conformation of every molecule in a SPICE HDF5 file."""
    try:
        h5 = open_hdf5(path)
    except ReadError as exc:
        report(on_error, exc)
        return
    with h5:
        expected = f"a SPICE group has 'atomic_numbers', 'conformations' and {energy_key!r}"
        for name in layout_groups(h5, ("atomic_numbers", "conformations"), path, on_error, expected):
            g = h5[name or "/"]
            try:
                numbers, positions, energy, forces = conformer_arrays(
                    g, path, name, "conformations", energy_key, gradient_key,
                    BOHR_TO_ANGSTROM, HARTREE_TO_EV, -HARTREE_TO_EV / BOHR_TO_ANGSTROM,
                )
                nconf = len(positions)
                info = {key: _text(g[key][()]) for key in ("smiles", "subset") if key in g}
            except ReadError as exc:
                report(on_error, exc)
                continue
            except (OSError, KeyError, ValueError) as exc:  # a damaged HDF5 dataset
                report(on_error, ReadError(f"unreadable group: {exc}", path, name))
                continue
            charge = float(smiles_formal_charge(info["smiles"])) if "smiles" in info else None
            label_keys = {"energy": energy_key, "forces": f"-{gradient_key}"} if forces is not None else {"energy": energy_key}
            if charge is not None:
                label_keys["charge"] = "smiles formal charges"
            for k in range(nconf):
                yield Frame(
                    positions=positions[k],
                    numbers=numbers,
                    energy=energy[k],
                    forces=None if forces is None else forces[k],
                    charge=charge,
                    label_keys=dict(label_keys),
                    dataset=dataset,
                    level_of_theory=level_of_theory,
                    source=source_id(path, f"{name}/{k}"),
                    info=dict(info),
                )
