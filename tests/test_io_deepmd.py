"""DeePMD npy and HDF5 readers against the raw arrays of the deepmd-kit example systems."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from lampretrain.io import ReadError, guess_format, read_frames
from lampretrain.io.deepmd import virial_to_stress

REAL = Path(__file__).parent / "data" / "real"
WATER = REAL / "deepmd_water"
NOPBC = REAL / "deepmd_nopbc_cho"
FEO_XML = REAL / "custodian_vasp_mp" / "FeO_PBEU_relax" / "vasprun.xml"


def test_water_sets_match_raw_arrays() -> None:
    assert guess_format(WATER) == "deepmd" and guess_format(WATER / "data_1") == "deepmd"
    frames = list(read_frames(WATER / "data_1"))
    assert len(frames) == 160
    assert frames[80].source == f"{WATER / 'data_1' / 'set.001'}#0"
    types = np.loadtxt(WATER / "data_1" / "type.raw", dtype=int)
    expected_numbers = np.array([8, 1])[types]  # type_map.raw: O H
    s1 = WATER / "data_1" / "set.001"
    coord, box = np.load(s1 / "coord.npy"), np.load(s1 / "box.npy")
    energy, force = np.load(s1 / "energy.npy"), np.load(s1 / "force.npy")
    for k in (0, 41, 79):
        f = frames[80 + k]
        np.testing.assert_array_equal(f.numbers, expected_numbers)
        np.testing.assert_array_equal(f.positions, coord[k].reshape(-1, 3).astype(np.float64))
        np.testing.assert_array_equal(f.cell, box[k].reshape(3, 3).astype(np.float64))
        np.testing.assert_array_equal(f.forces, force[k].reshape(-1, 3).astype(np.float64))
        assert f.energy == float(energy[k]) and f.stress is None and f.pbc.all()


def test_directory_of_systems_reads_all_in_sorted_order() -> None:
    frames = list(read_frames(WATER))
    assert len(frames) == 240
    assert "data_0/set.000#0" in frames[0].source and "data_1/set.001#79" in frames[-1].source


def test_nopbc_systems_are_molecules() -> None:
    frames = list(read_frames(NOPBC))
    assert len(frames) == 2062
    assert all(f.cell is None and not f.pbc.any() for f in frames)
    raw = np.load(NOPBC / "C1H4O2" / "set.000" / "energy.npy")
    c1 = [f for f in frames if "/C1H4O2/" in f.source]
    assert len(c1) == 1562
    np.testing.assert_array_equal([f.energy for f in c1], raw.astype(np.float64))
    assert sorted(c1[0].composition().items()) == [(1, 4), (6, 1), (8, 2)]


def _write_system(root: Path, frames) -> None:
    """A deepmd system from frames of one composition, virial in DeePMD's convention W = −V·σ."""
    root.mkdir()
    symbols = sorted({int(z) for z in frames[0].numbers})
    (root / "type_map.raw").write_text(" ".join({26: "Fe", 8: "O"}[z] for z in symbols))
    (root / "type.raw").write_text(" ".join(str(symbols.index(int(z))) for z in frames[0].numbers))
    s = root / "set.000"
    s.mkdir()
    cells = np.stack([f.cell for f in frames])
    stress = np.stack([f.stress for f in frames])
    np.save(s / "coord.npy", np.stack([f.positions.ravel() for f in frames]))
    np.save(s / "box.npy", cells.reshape(len(frames), 9))
    np.save(s / "energy.npy", np.array([f.energy for f in frames]))
    np.save(s / "force.npy", np.stack([f.forces.ravel() for f in frames]))
    np.save(s / "virial.npy", (-stress * np.abs(np.linalg.det(cells))[:, None, None]).reshape(len(frames), 9))


def test_virial_becomes_ase_stress(tmp_path: Path) -> None:
    vasp = list(read_frames(FEO_XML))
    _write_system(tmp_path / "feo", vasp)
    frames = list(read_frames(tmp_path / "feo"))
    assert len(frames) == 28
    for f, ref in zip(frames, vasp):
        np.testing.assert_allclose(f.stress, ref.stress, rtol=1e-12, atol=1e-16)
        np.testing.assert_array_equal(f.numbers, ref.numbers)
    # σ = −W/V: a positive (tensile) diagonal virial gives compressive (negative) stress.
    assert virial_to_stress(np.eye(3) * 2.0, np.eye(3) * 2.0)[0, 0] == pytest.approx(-0.25)


def _to_hdf5(path: Path, systems: list[Path]) -> None:
    with h5py.File(path, "w") as h5:
        for system in systems:
            g = h5.create_group(system.name)
            g.create_dataset("type.raw", data=np.loadtxt(system / "type.raw", dtype=int, ndmin=1))
            g.create_dataset("type_map.raw", data=np.array((system / "type_map.raw").read_text().split(), dtype="S"))
            if (system / "nopbc").exists():
                g.create_dataset("nopbc", data=True)
            for set_dir in sorted(system.glob("set.*")):
                sg = g.create_group(set_dir.name)
                for npy in sorted(set_dir.glob("*.npy")):
                    sg.create_dataset(npy.name, data=np.load(npy))


@pytest.mark.parametrize("root", [WATER, NOPBC])
def test_hdf5_systems_equal_npy_systems(tmp_path: Path, root: Path) -> None:
    systems = sorted(p for p in root.iterdir() if p.is_dir())
    path = tmp_path / "systems.h5"
    _to_hdf5(path, systems)
    assert guess_format(path) == "deepmd_hdf5"
    from_h5 = list(read_frames(path))
    from_npy = list(read_frames(root))
    assert len(from_h5) == len(from_npy)
    for a, b in zip(from_h5, from_npy):
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.numbers, b.numbers)
        np.testing.assert_array_equal(a.forces, b.forces)
        assert a.energy == b.energy and (a.cell is None) == (b.cell is None)
        if a.cell is not None:
            np.testing.assert_array_equal(a.cell, b.cell)
    last_set = sorted(systems[-1].glob("set.*"))[-1]
    last_k = len(np.load(last_set / "energy.npy")) - 1
    assert from_h5[-1].source == f"{path}#{systems[-1].name}/{last_set.name}/{last_k}"


def test_wrong_array_shape_is_reported_per_frame_and_other_sets_still_read(tmp_path: Path) -> None:
    system = tmp_path / "data_1"
    shutil.copytree(WATER / "data_1", system)
    force = np.load(system / "set.000" / "force.npy")
    np.save(system / "set.000" / "force.npy", force[:, :-3])  # one atom short
    errors: list[ReadError] = []
    frames = list(read_frames(system, on_error=errors.append))
    assert len(frames) == 80 and all("set.001" in f.source for f in frames)
    assert len(errors) == 80 and {e.field for e in errors} == {"force.npy"}
    assert errors[3].source == f"{system / 'set.000'}#3"
    with pytest.raises(ReadError, match="force.npy"):
        list(read_frames(system))


def test_type_map_option_overrides_the_file(tmp_path: Path) -> None:
    system = tmp_path / "sys"
    shutil.copytree(WATER / "data_0", system)
    (system / "type_map.raw").unlink()
    with pytest.raises(ReadError, match="type_map"):
        list(read_frames(system))
    frames = list(read_frames(system, type_map=["O", "H"]))
    assert len(frames) == 80 and sorted(frames[0].composition().items()) == [(1, 128), (8, 64)]
