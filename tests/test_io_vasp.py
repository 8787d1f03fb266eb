"""VASP readers against the numbers written in the custodian vasprun.xml / OUTCAR fixtures."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from lampretrain.frames import KBAR_TO_EV_PER_A3
from lampretrain.io import ReadError, guess_format, read_frames

REAL = Path(__file__).parent / "data" / "real" / "custodian_vasp_mp"
FEO = REAL / "FeO_PBEU_relax"
AL = REAL / "Al_r2SCAN_relax"


def _varray(elem, name: str) -> np.ndarray:
    return np.array([[float(x) for x in v.text.split()] for v in elem.find(f"varray[@name='{name}']")])


def _raw_steps(path: Path) -> list[dict]:
    """Per ionic step: forces, stress (kB, VASP sign) and the sigma→0 energy, straight from the XML."""
    steps = []
    for calc in ET.parse(path).getroot().iter("calculation"):
        last_scf = calc.findall("scstep/energy")[-1]
        e_fr = float(calc.find("energy/i[@name='e_fr_energy']").text)
        e0, efr = (float(last_scf.find(f"i[@name='{key}']").text) for key in ("e_0_energy", "e_fr_energy"))
        smearing = e0 - efr
        steps.append(dict(forces=_varray(calc, "forces"), stress=_varray(calc, "stress"), energy=e_fr + smearing))
    return steps


@pytest.mark.parametrize("run, nsteps", [(FEO, 28), (AL, 2)])
def test_vasprun_matches_raw_xml(run: Path, nsteps: int) -> None:
    frames = list(read_frames(run / "vasprun.xml", dataset="mp", level_of_theory="PBE+U"))
    raw = _raw_steps(run / "vasprun.xml")
    assert len(frames) == len(raw) == nsteps
    for frame, step in zip(frames, raw):
        assert frame.energy == pytest.approx(step["energy"], abs=1e-8)
        np.testing.assert_allclose(frame.forces, step["forces"], atol=1e-12)
        # VASP "in kB", compression positive → ASE sign, eV/Å³.  The printed tensor is symmetric only
        # to ~1e-6 relative; ASE keeps its upper triangle.
        upper = np.triu(step["stress"]) + np.triu(step["stress"], 1).T
        np.testing.assert_allclose(frame.stress, -upper * KBAR_TO_EV_PER_A3, rtol=1e-12, atol=1e-15)
        assert frame.cell is not None and frame.pbc.all()
        frame.validate()
    assert frames[0].dataset == "mp" and frames[0].level_of_theory == "PBE+U"
    assert frames[-1].source == f"{run / 'vasprun.xml'}#{nsteps - 1}"


def test_outcar_stress_energy_and_magmoms() -> None:
    frames = list(read_frames(FEO / "OUTCAR"))
    assert len(frames) == 28
    lines = (FEO / "OUTCAR").read_text().splitlines()
    in_kb = [np.array(line.split()[2:8], dtype=float) for line in lines if line.strip().startswith("in kB")]
    sigma0 = [float(line.split()[-1]) for line in lines if "energy(sigma->0)" in line]
    xx, yy, zz, xy, yz, zx = in_kb[-1]  # OUTCAR order
    expected = -np.array([[xx, xy, zx], [xy, yy, yz], [zx, yz, zz]]) * KBAR_TO_EV_PER_A3
    np.testing.assert_allclose(frames[-1].stress, expected, rtol=1e-9)
    assert frames[-1].energy == pytest.approx(sigma0[-1], abs=1e-8)
    # AFM start (5, -5, 0.6, 0.6) relaxes to the moments the README quotes.
    np.testing.assert_allclose(frames[-1].magmoms, [3.007, 1.397, -0.189, -0.189], atol=1e-6)


def test_run_directory_takes_steps_from_xml_and_magmoms_from_outcar() -> None:
    assert guess_format(FEO) == "vasp_dir"
    frames = list(read_frames(FEO))
    outcar = list(read_frames(FEO / "OUTCAR"))
    assert len(frames) == 28
    assert frames[0].source.endswith("vasprun.xml#0")
    for frame, step in zip(frames, outcar):
        np.testing.assert_array_equal(frame.magmoms, step.magmoms)
    assert frames[0].magmoms[0] > 0 > frames[0].magmoms[1]  # still antiferromagnetic at step 0
    al = list(read_frames(AL))
    assert len(al) == 2 and al[0].magmoms is None


def test_truncated_vasprun_yields_complete_steps_then_one_error(tmp_path: Path) -> None:
    text = (FEO / "vasprun.xml").read_bytes()
    starts = [m.start() for m in re.finditer(rb"<calculation>", text)]
    cut = tmp_path / "vasprun.xml"
    cut.write_bytes(text[: starts[14] + 500])  # inside the 15th ionic step
    errors: list[ReadError] = []
    frames = list(read_frames(cut, on_error=errors.append))
    assert len(frames) == 14
    assert len(errors) == 1
    assert errors[0].index == 14 and errors[0].path == str(cut)
    full = list(read_frames(FEO / "vasprun.xml"))
    for a, b in zip(frames, full):
        assert a.energy == b.energy
    with pytest.raises(ReadError, match="vasprun.xml#"):
        list(read_frames(cut))


def test_truncated_outcar_yields_complete_steps_then_one_error(tmp_path: Path) -> None:
    text = (FEO / "OUTCAR").read_bytes()
    cut = tmp_path / "OUTCAR"
    cut.write_bytes(text[: int(len(text) * 0.6)])
    errors: list[ReadError] = []
    frames = list(read_frames(cut, on_error=errors.append))
    assert 0 < len(frames) < 28 and len(errors) == 1
    assert errors[0].index == len(frames)
