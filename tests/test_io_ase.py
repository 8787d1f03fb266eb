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


def _feo_lines(tmp_path: Path) -> tuple[list, list[str]]:
    """The 28 FeO frames and their extxyz lines: 6 per frame (count, comment, 4 atoms), frame k from line 6k + 1."""
    path = tmp_path / "feo.extxyz"
    original = _write_feo_extxyz(path)
    return original, path.read_text().splitlines(keepends=True)


def _unknown_element(lines: list[str]) -> None:
    lines[32] = "Xx" + lines[32][2:]  # frame 5, first atom (Fe)


def _header_too_big(lines: list[str]) -> None:
    lines[30] = "5\n"


def _header_too_small(lines: list[str]) -> None:
    lines[30] = "3\n"


def _bad_number(lines: list[str]) -> None:
    lines[33] = lines[33].replace("0.00000000", "0.0000z000", 1)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_unknown_element, "unknown element 'Xx' in frame 5 (line 33)"),
        (_header_too_big, "header on line 31 says 5 atoms, 4 atom lines follow before the next header on line 37"),
        (_header_too_small, "header on line 31 says 3 atoms, 4 atom lines follow (lines 33-36)"),
        (_bad_number, "frame 5 (lines 31-36) cannot be parsed: ValueError: could not convert string to float"),
    ],
)
def test_one_bad_extxyz_frame_costs_only_itself(tmp_path: Path, damage, reason: str) -> None:
    original, lines = _feo_lines(tmp_path)
    damage(lines)
    path = tmp_path / "damaged.extxyz"
    path.write_text("".join(lines))
    errors: list[ReadError] = []
    frames = list(read_frames(path, on_error=errors.append))
    assert [e.index for e in errors] == [5] and str(errors[0]).startswith(f"{path}#5: {reason}")
    kept = [k for k in range(28) if k != 5]
    assert [f.source for f in frames] == [f"{path}#{k}" for k in kept]
    for frame, k in zip(frames, kept):
        assert frame.energy == pytest.approx(original[k].energy, abs=1e-8)
        np.testing.assert_allclose(frame.positions, original[k].positions, atol=1e-8)
    with pytest.raises(ReadError, match="#5: "):
        list(read_frames(path))


def test_text_between_extxyz_frames_is_its_own_record(tmp_path: Path) -> None:
    original, lines = _feo_lines(tmp_path)
    path = tmp_path / "junk.extxyz"
    path.write_text("".join(lines[:36] + ["# written by hand\n", "end of run 1\n"] + lines[36:]))
    errors: list[ReadError] = []
    frames = list(read_frames(path, on_error=errors.append))
    assert [(e.index, str(e)) for e in errors] == [
        (6, f"{path}#6: lines 37-38: not an extxyz frame, expected an atom count, got '# written by hand'")
    ]
    assert len(frames) == 28 and frames[6].source == f"{path}#7"  # every frame kept; the text took index 6
    assert [f.energy for f in frames] == pytest.approx([f.energy for f in original], abs=1e-8)


def test_extxyz_cut_inside_its_last_line_is_reported(tmp_path: Path) -> None:
    """A copy cut mid-number would still parse, with a wrong last coordinate; the missing newline gives it away."""
    original, lines = _feo_lines(tmp_path)
    path = tmp_path / "cut.extxyz"
    path.write_text("".join(lines)[:-3])  # "... 0.05829632\n" -> "... 0.058296": still six numbers
    errors: list[ReadError] = []
    frames = list(read_frames(path, on_error=errors.append))
    assert len(frames) == 27 and frames[-1].energy == pytest.approx(original[26].energy, abs=1e-8)
    assert [str(e) for e in errors] == [f"{path}#27: the file ends inside line 168 without a newline (truncated)"]


def test_extxyz_from_a_windows_editor_reads_every_frame(tmp_path: Path) -> None:
    original, lines = _feo_lines(tmp_path)
    path = tmp_path / "windows.extxyz"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(lines).replace("\n", "\r\n").encode())  # byte-order mark, CRLF
    frames = list(read_frames(path))
    assert [f.energy for f in frames] == pytest.approx([f.energy for f in original], abs=1e-8) and len(frames) == 28


def test_empty_blank_and_binary_files_are_one_record_each(tmp_path: Path) -> None:
    empty, blank, binary = tmp_path / "empty.extxyz", tmp_path / "blank.xyz", tmp_path / "garbage.xyz"
    empty.write_bytes(b"")
    blank.write_text("\n  \n\n")
    binary.write_bytes(bytes(range(256)) * 8)
    expected = {
        str(empty): "empty file",
        str(blank): "empty file (only blank lines)",
        str(binary): "binary content (NUL bytes or invalid UTF-8), not extxyz text",
    }
    for path, reason in expected.items():
        errors: list[ReadError] = []
        assert list(read_frames(path, on_error=errors.append)) == []
        assert [str(e) for e in errors] == [f"{path}: {reason}"]
        with pytest.raises(ReadError, match=reason.split(" (")[0]):
            list(read_frames(path))
    errors = []
    assert list(read_frames(tmp_path, on_error=errors.append)) == []  # the same through a directory
    assert sorted(str(e) for e in errors) == sorted(f"{p}: {r}" for p, r in expected.items())


def test_damaged_aselmdb_is_one_record_and_no_traceback(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("ase_db_backends")
    import gc
    import sys

    unraisable: list = []  # what Python would print as "Exception ignored in ..." with a traceback
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    path = tmp_path / "oxides.aselmdb"
    path.write_bytes(bytes(range(256)) * 64)
    errors: list[ReadError] = []
    assert list(read_frames(path, on_error=errors.append)) == []
    gc.collect()  # a half-built ase-db-backends database raises from __del__ when collected
    assert [str(e) for e in errors] == [f"{path}: cannot open database: {path}: MDB_INVALID: File is not an LMDB file"]
    assert unraisable == []
