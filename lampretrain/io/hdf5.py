"""Shared HDF5 access for the SPICE, ANI and DeePMD readers: opening with a ReadError, finding groups."""

from __future__ import annotations

from pathlib import Path

from lampretrain.io.errors import ErrorHandler, ReadError, report


def open_hdf5(path: str | Path):
    """``h5py.File(path, "r")``, with a damaged or non-HDF5 file raised as a ReadError naming it."""
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise ReadError(f"not a readable HDF5 file: {exc}", path, field="format") from None


def groups_with(h5, required: tuple[str, ...]) -> list[str]:
    """Names of every group (at any depth, the root as "") holding all ``required`` members, sorted."""
    names = [""] if all(key in h5 for key in required) else []

    def visit(name: str, obj) -> None:
        if hasattr(obj, "keys") and all(key in obj for key in required):
            names.append(name)

    h5.visititems(visit)
    return sorted(names)


def layout_groups(h5, required: tuple[str, ...], path: str | Path, on_error: ErrorHandler, expected: str) -> list[str]:
    """:func:`groups_with` ``required``, after reporting every other group that holds datasets (``expected``
    says what a group of the reader's layout has): without a record, a group of another layout or with a
    misspelt key would vanish from prep unnoticed.  Groups holding only groups are hierarchy, not records."""
    import h5py

    matched = groups_with(h5, required)
    others: list[tuple[str, list[str]]] = []

    def visit(name: str, obj) -> None:
        if isinstance(obj, h5py.Group) and name not in matched:
            if any(isinstance(member, h5py.Dataset) for member in obj.values()):
                others.append((name, sorted(obj.keys())))

    visit("", h5)
    h5.visititems(visit)
    for name, keys in sorted(others):
        shown = ", ".join(map(repr, keys[:12])) + (", ..." if len(keys) > 12 else "")
        report(on_error, ReadError(f"group of no known layout: it has {shown}; {expected}", path, name or "/"))
    return matched


def conformer_arrays(
    g,
    path: str | Path,
    name: str,
    positions_key: str,
    energy_key: str,
    forces_key: str,
    length_scale: float,
    energy_scale: float,
    forces_scale: float,
):
    """(numbers (N,), positions (M, N, 3) Å, energy (M,) eV, forces (M, N, 3) eV/Å or None) of one
    conformer group, scaled to lampretrain units; a shape mismatch or a missing energy is a ReadError
    naming the group and dataset. ``forces_scale`` carries the sign (−1 × ... for gradients)."""
    import numpy as np

    numbers = np.asarray(g["atomic_numbers"][()], dtype=np.int64)
    positions = np.asarray(g[positions_key][()], dtype=np.float64) * length_scale  # (M, N, 3)
    if positions.ndim != 3 or positions.shape[1:] != (len(numbers), 3):
        raise ReadError(f"expected (M, {len(numbers)}, 3), got {positions.shape}", path, name, positions_key)
    if energy_key not in g:
        raise ReadError(f"missing dataset {energy_key!r}", path, name, energy_key)
    energy = np.asarray(g[energy_key][()], dtype=np.float64) * energy_scale  # (M,)
    if energy.shape != (len(positions),):
        raise ReadError(f"expected ({len(positions)},), got {energy.shape}", path, name, energy_key)
    forces = None
    if forces_key in g:
        forces = np.asarray(g[forces_key][()], dtype=np.float64) * forces_scale  # (M, N, 3)
        if forces.shape != positions.shape:
            raise ReadError(f"expected {positions.shape}, got {forces.shape}", path, name, forces_key)
    return numbers, positions, energy, forces
