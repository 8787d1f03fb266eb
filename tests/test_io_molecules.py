"""SPICE and ANI-1x HDF5 readers: unit conversions against the raw datasets, charges, NaN labels."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from lampretrain.frames import BOHR_TO_ANGSTROM, HARTREE_TO_EV
from lampretrain.io import ReadError, guess_format, read_frames
from lampretrain.io.spice import smiles_formal_charge

REAL = Path(__file__).parent / "data" / "real"
SPICE = REAL / "spice_hdf5" / "SPICE-1.1.4_n2.hdf5"
ANI = REAL / "ani1x_hdf5" / "ani1_n5.hdf5"


def test_spice_bohr_hartree_gradient_conversions() -> None:
    assert guess_format(SPICE) == "spice_hdf5"
    frames = list(read_frames(SPICE, dataset="spice", level_of_theory="wB97M-D3(BJ)/def2-TZVPPD"))
    assert len(frames) == 55
    with h5py.File(SPICE) as h5:
        for name in h5:
            g = h5[name]
            mine = [f for f in frames if f.source.startswith(f"{SPICE}#{name}/")]
            assert len(mine) == len(g["conformations"])
            for k, f in enumerate(mine):
                assert f.source == f"{SPICE}#{name}/{k}"
                np.testing.assert_array_equal(f.numbers, g["atomic_numbers"][()])
                bohr = g["conformations"][k].astype(np.float64)
                np.testing.assert_allclose(f.positions, bohr * BOHR_TO_ANGSTROM, rtol=1e-15)
                assert f.energy == pytest.approx(g["dft_total_energy"][k] * HARTREE_TO_EV, rel=1e-15)
                # gradient = dE/dx, forces = −gradient, hartree/bohr → eV/Å
                expected = -g["dft_total_gradient"][k].astype(np.float64) * HARTREE_TO_EV / BOHR_TO_ANGSTROM
                np.testing.assert_allclose(f.forces, expected, rtol=1e-15)
                assert f.cell is None and not f.pbc.any()
                f.validate()


def test_spice_charge_comes_from_smiles_formal_charges() -> None:
    charges = {f.info["smiles"]: f.charge for f in read_frames(SPICE)}
    assert sorted(charges.values()) == [1.0, 1.0]  # C8H18N+ (quaternary [N+:9]) and C#C.[Na+]
    assert smiles_formal_charge("[NH3+]CC(=O)[O-]") == 0
    assert smiles_formal_charge("[O-]S(=O)(=O)[O-]") == -2
    assert smiles_formal_charge("[Fe+2].[Cl-].[Cl-]") == 0
    assert smiles_formal_charge("[O--]") == -2 and smiles_formal_charge("[Fe+++]") == 3
    assert smiles_formal_charge("C[N+:3](C)(C)C") == 1
    assert smiles_formal_charge("[C@@H](F)(Cl)Br") == 0


def test_ani_hartree_conversions_default_method() -> None:
    assert guess_format(ANI) == "ani_hdf5"
    frames = list(read_frames(ANI))
    assert len(frames) == 8
    with h5py.File(ANI) as h5:
        k = 0
        for name in sorted(h5):
            g = h5[name]
            for j in range(len(g["coordinates"])):
                f = frames[k]
                assert f.source == f"{ANI}#{name}/{j}"
                np.testing.assert_array_equal(f.positions, g["coordinates"][j].astype(np.float64))
                assert f.energy == pytest.approx(g["wb97x_dz.energy"][j] * HARTREE_TO_EV, rel=1e-15)
                hartree_per_a = g["wb97x_dz.forces"][j].astype(np.float64)
                np.testing.assert_allclose(f.forces, hartree_per_a * HARTREE_TO_EV, rtol=1e-15)
                assert f.info == {"method": "wb97x_dz"}
                f.validate()
                k += 1
    tz = list(read_frames(ANI, method="wb97x_tz"))
    assert all(a.energy != b.energy for a, b in zip(tz, frames))


def test_ani_nan_means_not_computed() -> None:
    frames = list(read_frames(ANI, method="ccsd(t)_cbs"))
    missing = [f for f in frames if f.energy is None]
    assert len(missing) == 2 and all("C1H6N2O5" in f.source for f in missing)
    assert all(f.info["missing"] == ["energy"] for f in missing)
    assert all(f.forces is None for f in frames)  # no forces at that level
    for f in frames:
        f.validate()
    with h5py.File(ANI) as h5:
        raw = h5["C1H6N2O5"]["ccsd(t)_cbs.energy"][()]
    present = [f.energy for f in frames if "C1H6N2O5" in f.source and f.energy is not None]
    assert present == pytest.approx(list(raw[np.isfinite(raw)] * HARTREE_TO_EV), rel=1e-15)


def test_ani_unknown_method_is_a_read_error() -> None:
    with pytest.raises(ReadError) as info:
        list(read_frames(ANI, method="b3lyp_nope"))
    assert info.value.field == "b3lyp_nope.energy"
    errors: list[ReadError] = []
    assert list(read_frames(ANI, method="b3lyp_nope", on_error=errors.append)) == []
    assert len(errors) == 5  # one per formula group


def test_truncated_hdf5_is_a_read_error(tmp_path: Path) -> None:
    cut = tmp_path / "ani.h5"
    cut.write_bytes(ANI.read_bytes()[:4000])
    with pytest.raises(ReadError, match="HDF5"):
        list(read_frames(cut))
    for fmt in ("ani_hdf5", None):  # None: the error comes from sniffing the layout, and is reported too
        errors: list[ReadError] = []
        assert list(read_frames(cut, format=fmt, on_error=errors.append)) == []
        assert len(errors) == 1 and errors[0].path == str(cut) and "not a readable HDF5 file" in str(errors[0])


@pytest.mark.parametrize("source, fmt, nframes", [(ANI, "ani_hdf5", 8), (SPICE, "spice_hdf5", 55)])
def test_group_of_no_known_layout_is_reported_beside_good_groups(tmp_path: Path, source, fmt, nframes) -> None:
    path = tmp_path / source.name
    path.write_bytes(source.read_bytes())
    with h5py.File(path, "a") as h5:
        odd = h5.create_group("batch2/C2H6O")  # positions/energies: neither ANI-1x's nor SPICE's names
        odd["atomic_numbers"] = np.array([6, 6, 8, 1, 1, 1, 1, 1, 1])
        odd["positions"] = np.zeros((2, 9, 3))
        odd["energies"] = np.array([-154.1, -154.2])
    assert guess_format(path) == fmt
    errors: list[ReadError] = []
    frames = list(read_frames(path, on_error=errors.append))
    assert [f.energy for f in frames] == [f.energy for f in read_frames(source)] and len(frames) == nframes
    assert [e.index for e in errors] == ["batch2/C2H6O"]  # the intermediate group "batch2" holds no datasets
    message = str(errors[0])
    assert message.startswith(f"{path}#batch2/C2H6O: group of no known layout: it has 'atomic_numbers', 'energies', ")
    expected = "'coordinates' and 'wb97x_dz.energy'" if fmt == "ani_hdf5" else "'conformations' and 'dft_total_energy'"
    assert message.endswith(expected)


def test_hdf5_with_no_known_group_names_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as h5:
        h5["mol1/positions"] = np.zeros((1, 2, 3))
    errors: list[ReadError] = []
    assert list(read_frames(tmp_path, on_error=errors.append)) == []
    assert [str(e) for e in errors] == [
        f"{path}: field 'format': HDF5 file with no SPICE, ANI-1x or DeePMD group (top-level keys ['mol1'])"
    ]
