"""Shared HDF5 access for the SPICE, ANI and DeePMD readers: opening with a ReadError, finding groups."""

from __future__ import annotations

from pathlib import Path

from lampretrain.io.errors import ReadError


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
