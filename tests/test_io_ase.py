"""extxyz / any-ASE, ASE SQLite db and .aselmdb readers against the fixtures' own numbers."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import ase.db
import ase.io
import numpy as np
import pytest

from lampretrain.io import ReadError, guess_format, read_frames

REAL = Path(__file__).parent / "data" / "real"
OXIDES = REAL / "fairchem_oxides_asedb" / "oxides.db"
FEO_XML = REAL / "custodian_vasp_mp" / "FeO_PBEU_relax" / "vasprun.xml"


def _write_feo_extxyz(path: Path) -> list:
    frames = list(read_frames(FEO_XML))
    ase.io.write(path, [f.to_atoms() for f in frames], format="extxyz")
    return frames


def test_extxyz_round_trip_keeps_labels(tmp_path: Path) -> None:
    path = tmp_path / "feo.extxyz"
    original = _write_feo_extxyz(path)
    assert guess_format(path) == "extxyz"
    frames = list(read_frames(path, dataset="feo", level_of_theory="PBE+U"))
    assert len(frames) == len(original) == 28
    for a, b in zip(frames, original):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-8)
        np.testing.assert_allclose(a.cell, b.cell, atol=1e-8)
        assert a.energy == pytest.approx(b.energy, abs=1e-8)
        np.testing.assert_allclose(a.forces, b.forces, atol=1e-8)
        np.testing.assert_allclose(a.stress, b.stress, atol=1e-12)
        assert a.pbc.all() and a.dataset == "feo" and a.level_of_theory == "PBE+U"
    assert frames[3].source == f"{path}#3"


def test_molecule_extxyz_has_no_cell_and_keeps_charge(tmp_path: Path) -> None:
    spice = next(iter(read_frames(REAL / "spice_hdf5" / "SPICE-1.1.4_n2.hdf5")))
    atoms = spice.to_atoms()
    path = tmp_path / "mol.xyz"
    ase.io.write(path, atoms, format="extxyz")
    (frame,) = read_frames(path)
    assert frame.cell is None and not frame.pbc.any()
    assert frame.charge == spice.charge == 1.0
    np.testing.assert_allclose(frame.forces, spice.forces, atol=1e-6)


def test_truncated_extxyz_yields_complete_frames_then_one_error(tmp_path: Path) -> None:
    path = tmp_path / "feo.extxyz"
    _write_feo_extxyz(path)
    lines = path.read_text().splitlines(keepends=True)
    per_frame = 4 + 2  # 4 atoms + count line + comment line
    cut = tmp_path / "cut.extxyz"
    cut.write_text("".join(lines[: 10 * per_frame + 4]))  # frame 10 stops after two atoms
    errors: list[ReadError] = []
    frames = list(read_frames(cut, on_error=errors.append))
    assert len(frames) == 10 and len(errors) == 1
    assert errors[0].index == 10 and str(cut) in str(errors[0])
    with pytest.raises(ReadError):
        list(read_frames(cut))


def test_ase_sqlite_db_matches_the_database_columns() -> None:
    assert guess_format(OXIDES) == "ase_db"
    frames = list(read_frames(OXIDES, dataset="oxides"))
    with sqlite3.connect(OXIDES) as con:
        raw = con.execute("select id, energy, natoms from systems order by id").fetchall()
    assert len(frames) == len(raw) == 295
    for frame, (row_id, energy, natoms) in zip(frames, raw):
        assert frame.source == f"{OXIDES}#{row_id}"
        assert frame.energy == energy and frame.natoms == natoms
        assert frame.forces.shape == (natoms, 3) and frame.stress is None and frame.magmoms is None
        frame.validate()


def test_aselmdb_holds_the_same_frames_as_the_sqlite_db(tmp_path: Path) -> None:
    pytest.importorskip("ase_db_backends")
    path = tmp_path / "oxides.aselmdb"
    with ase.db.connect(OXIDES) as src, ase.db.connect(path) as dst:
        for row in src.select():
            dst.write(row.toatoms(), key_value_pairs=row.key_value_pairs)
    assert guess_format(path) == "aselmdb"
    lmdb_frames = list(read_frames(path))
    sqlite_frames = list(read_frames(OXIDES))
    assert len(lmdb_frames) == len(sqlite_frames) == 295
    for a, b in zip(lmdb_frames, sqlite_frames):
        np.testing.assert_array_equal(a.numbers, b.numbers)
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.cell, b.cell)
        np.testing.assert_array_equal(a.forces, b.forces)
        assert a.energy == b.energy
