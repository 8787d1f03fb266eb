"""Labels under other names: key mapping, virials, pymatgen entries, the warnings and the census.

Sources are the real fixtures' own numbers: the FeO relaxation (vasprun.xml, OUTCAR), the mlearn Mo
JSON, and files written from them in the layouts fitting codes and pymatgen use.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import ase.db
import ase.io
import h5py
import numpy as np
import pytest
import yaml

from lampretrain.frames import KBAR_TO_EV_PER_A3
from lampretrain.io import ReadError, ReadWarning, read_frames
from lampretrain.prep.pipeline import prepare
from lampretrain.prep.spec import load_spec

REAL = Path(__file__).parent / "data" / "real"
FEO = REAL / "custodian_vasp_mp" / "FeO_PBEU_relax"
MO = REAL / "mlearn_pbe_elemental" / "Mo" / "test.json"


def _fitting_set(path: Path, voigt: bool = False) -> list:
    """The FeO steps as a fitting code writes them: DFT_energy and virial in the comment line, force per atom.

    ASE's extxyz insists that a key named ``virial`` holds 9 values, so the Voigt form is ``virial_voigt``.
    """
    steps = ase.io.read(FEO / "vasprun.xml", index=":")
    out = []
    for atoms in steps:
        plain = atoms.copy()
        plain.calc = None
        plain.info["DFT_energy"] = atoms.get_potential_energy()
        plain.arrays["force"] = atoms.get_forces()
        virial = -atoms.get_volume() * atoms.get_stress(voigt=voigt)  # W = −V σ
        plain.info["virial_voigt" if voigt else "virial"] = virial
        out.append(plain)
    ase.io.write(path, out, format="extxyz")
    return steps


def test_extxyz_force_and_virial_are_found_and_the_energy_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "fit.extxyz"
    steps = _fitting_set(path)
    seen: list[ReadError] = []
    frames = list(read_frames(path, on_error=seen.append))
    assert len(frames) == len(steps) == 28
    for frame, atoms in zip(frames, steps):
        np.testing.assert_array_equal(frame.forces, atoms.get_forces())
        np.testing.assert_allclose(frame.stress, atoms.get_stress(voigt=False), rtol=1e-8, atol=0)
        assert frame.energy is None  # DFT_energy is a guess nobody made: warned, not taken
        assert frame.label_keys == {"forces": "arrays.force", "stress": "info.virial"}
        assert "virial" not in frame.info and "force" not in frame.info
    (warning,) = seen
    assert isinstance(warning, ReadWarning) and warning.keys == ["DFT_energy"]
    assert str(warning) == (
        f"{path}#0: label-like data not read: info 'DFT_energy'; map it with keys: {{energy: DFT_energy}} "
        "or silence it with ignore: [DFT_energy]"
    )

    mapped = list(read_frames(path, keys={"energy": "DFT_energy", "forces": "force", "virial": "virial"},
                              on_error=seen.append))
    assert len(seen) == 1  # nothing more to say
    assert [f.energy for f in mapped] == [a.get_potential_energy() for a in steps]
    assert mapped[0].label_keys == {"energy": "info.DFT_energy", "forces": "arrays.force", "stress": "info.virial"}
    silenced: list[ReadError] = []
    assert len(list(read_frames(path, ignore=["DFT_energy"], on_error=silenced.append))) == 28 and not silenced


def test_six_component_virial_is_ase_voigt_order(tmp_path: Path) -> None:
    path = tmp_path / "fit6.extxyz"
    steps = _fitting_set(path, voigt=True)
    frames = list(read_frames(path, keys={"virial": "virial_voigt"}, ignore=["DFT_energy"]))
    assert len(frames) == 28
    for frame, atoms in zip(frames, steps):
        np.testing.assert_allclose(frame.stress, atoms.get_stress(voigt=False), rtol=1e-8, atol=0)


def _outcar_totals(path: Path) -> list[np.ndarray]:
    """The "Total" row (eV) of each FORCE on cell block: VASP's virial, order XX YY ZZ XY YZ ZX."""
    totals = []
    lines = path.read_text().splitlines()
    for k, line in enumerate(lines):
        if line.strip().startswith("FORCE on cell"):
            row = next(r for r in lines[k:] if r.split()[:1] == ["Total"])
            xx, yy, zz, xy, yz, zx = map(float, row.split()[1:])
            totals.append(np.array([[xx, xy, zx], [xy, yy, yz], [zx, yz, zz]]))
    return totals


def test_outcar_virial_gives_the_stress_vasp_prints_in_kb(tmp_path: Path) -> None:
    """One calculation, two printed forms: the virial (eV) and the stress (kB) of every FeO step."""
    steps = ase.io.read(FEO / "OUTCAR", index=":")
    totals = _outcar_totals(FEO / "OUTCAR")
    assert len(totals) == len(steps) == 28
    images = []
    for atoms, virial in zip(steps, totals):
        plain = atoms.copy()
        plain.info["virial"] = virial
        images.append(plain)
    ase.io.write(tmp_path / "virial.extxyz", images, format="extxyz")
    frames = list(read_frames(tmp_path / "virial.extxyz", keys={"virial": "virial"}))
    for frame, atoms in zip(frames, steps):
        # "Total" has 5 decimals in eV; the kB row 5 decimals too: agreement to print precision
        np.testing.assert_allclose(frame.stress, atoms.get_stress(voigt=False), rtol=0, atol=1e-5 / atoms.get_volume())
        assert abs(frame.stress).max() > 1e-3  # a stressed cell, not a trivially zero comparison


def test_a_molecule_with_a_virial_is_an_error_naming_the_record(tmp_path: Path) -> None:
    atoms = ase.io.read(FEO / "vasprun.xml", index=0)
    molecule = atoms.copy()
    molecule.calc = None
    molecule.pbc = False
    molecule.cell = None
    molecule.info["virial"] = np.eye(3)
    ase.io.write(tmp_path / "mol.extxyz", [molecule, molecule], format="extxyz")
    seen: list[ReadError] = []
    assert list(read_frames(tmp_path / "mol.extxyz", on_error=seen.append)) == []
    assert [str(e) for e in seen] == [
        f"{tmp_path / 'mol.extxyz'}#{k}: field 'virial': 'virial' holds a virial but the frame has no cell "
        "(a molecule): a virial needs a volume; leave it out with ignore: [virial]" for k in (0, 1)
    ]


def _entries(tmp_path: Path, stress_form: str) -> tuple[Path, list[dict]]:
    """The Mo records as ComputedStructureEntry.as_dict() writes them, forces and virials in ``data``."""
    from monty.json import MontyEncoder
    from pymatgen.core import Lattice, Structure
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    records = json.loads(MO.read_text())[:5]
    entries = []
    for k, rec in enumerate(records):
        s = rec["structure"]
        structure = Structure(Lattice(s["lattice"]["matrix"]), [x["species"][0]["element"] for x in s["sites"]],
                              [x["xyz"] for x in s["sites"]], coords_are_cartesian=True)
        xx, yy, zz, xy, yz, zx = rec["outputs"]["virial_stress"]
        kbar = np.array([[xx, xy, zx], [xy, yy, yz], [zx, yz, zz]])
        stress = -kbar * KBAR_TO_EV_PER_A3
        data = {"forces": np.asarray(rec["outputs"]["forces"])}
        if stress_form == "virials":
            data["virials"] = -structure.volume * stress
        else:
            data["stress"] = kbar
        data["ref_energy"] = 1.0
        entry = ComputedStructureEntry(structure, rec["outputs"]["energy"], correction=-0.25 * k, data=data,
                                       entry_id=f"mo-{k}")
        entries.append(entry.as_dict())
    path = tmp_path / f"entries_{stress_form}.json"
    path.write_text(json.dumps(entries, cls=MontyEncoder))
    return path, records


@pytest.mark.parametrize("stress_form", ["virials", "stress"])
def test_computed_structure_entries_keep_forces_and_stress(tmp_path: Path, stress_form: str) -> None:
    path, records = _entries(tmp_path, stress_form)
    seen: list[ReadError] = []
    frames = list(read_frames(path, on_error=seen.append))
    assert len(frames) == 5
    for k, (frame, rec) in enumerate(zip(frames, records)):
        xx, yy, zz, xy, yz, zx = rec["outputs"]["virial_stress"]
        expected = -KBAR_TO_EV_PER_A3 * np.array([[xx, xy, zx], [xy, yy, yz], [zx, yz, zz]])
        np.testing.assert_allclose(frame.stress, expected, rtol=1e-8, atol=0)
        np.testing.assert_array_equal(frame.forces, rec["outputs"]["forces"])
        assert frame.energy == rec["outputs"]["energy"]  # uncorrected by default
        assert frame.label_keys == {"energy": "energy (pymatgen uncorrected_energy)", "forces": "data.forces",
                                    "stress": f"data.{stress_form}"}
    assert [str(w) for w in seen] == [
        f"{path}#0: label-like data not read: data 'ref_energy'; map it with keys: {{energy: ref_energy}} "
        "or silence it with ignore: [ref_energy]"
    ]
    corrected = list(read_frames(path, use_corrected=True, ignore=["ref_energy"]))
    assert [f.energy for f in corrected] == [rec["outputs"]["energy"] - 0.25 * k for k, rec in enumerate(records)]
    single = tmp_path / "one.json"
    single.write_text(json.dumps(json.loads(path.read_text())[2]))
    (one,) = read_frames(single, ignore=["ref_energy"])
    np.testing.assert_array_equal(one.forces, frames[2].forces)


def test_prep_census_warnings_and_inspect(tmp_path: Path) -> None:
    fit = tmp_path / "fit.extxyz"
    _fitting_set(fit)
    spec = {
        "name": "labels",
        "output": str(tmp_path / "store"),
        "formats": ["lmdb"],
        "sources": [
            {"path": str(fit), "dataset": "mapped", "keys": {"energy": "DFT_energy"}},
            {"path": str(REAL / "custodian_vasp_mp" / "Al_r2SCAN_relax"), "dataset": "al"},
            {"path": str(MO), "dataset": "mo"},
        ],
        "split": {"val": 0.0},
    }
    energies_only = tmp_path / "energies.extxyz"
    steps = ase.io.read(FEO / "vasprun.xml", index=":4")
    for atoms in steps:
        atoms.calc.results = {"energy": atoms.calc.results["energy"]}
        atoms.arrays["REF_force"] = np.zeros((len(atoms), 3))
    ase.io.write(energies_only, steps, format="extxyz")
    spec["sources"].append({"path": str(energies_only), "dataset": "nof"})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    report = prepare(load_spec(tmp_path / "spec.yaml"), workers=1, progress=False)
    census = json.loads((tmp_path / "store" / "report.json").read_text())["labels"]
    assert census == report["labels"]
    assert census["mapped"]["frames"] == 28
    assert census["mapped"]["energy"] == {"frames": 28, "keys": {"info.DFT_energy": 28}}
    assert census["mapped"]["forces"] == {"frames": 28, "keys": {"arrays.force": 28}}
    assert census["mapped"]["stress"] == {"frames": 28, "keys": {"info.virial": 28}}
    assert census["al"]["stress"] == {"frames": 2, "keys": {"calc.stress": 2}}
    assert census["mo"]["forces"]["keys"] == {"outputs.forces": 23}
    assert census["nof"]["forces"]["frames"] == 0 and census["nof"]["energy"]["frames"] == 4
    (warning,) = report["warnings"]
    assert warning["keys"] == ["REF_force"] and warning["source"] == f"{energies_only}#0"
    assert "map it with keys: {forces: REF_force}" in warning["reason"]

    inspect = subprocess.run([sys.executable, "-m", "lampretrain.cli", "inspect", str(tmp_path / "store")],
                             capture_output=True, text=True, check=True).stdout
    assert "WARNING: dataset nof has forces on 0 % of its 4 frames (energies only)" in inspect
    assert "  mapped: 28 frames; energy 100 % (info.DFT_energy); forces 100 % (arrays.force); stress 100 % (info.virial)" in inspect
    import contextlib
    import io

    from lampretrain.cli import _print_report

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        _print_report(spec["output"], report)
    first = text.getvalue().splitlines()[0]
    assert first == "WARNING: dataset nof has forces on 0 % of its 4 frames (energies only)"


# ---- every reader on every fixture: labels found == labels present, counted without lampretrain --------------


def _count_deepmd(root: Path) -> Counter:
    counts: Counter = Counter()
    for set_dir in sorted(root.rglob("set.*")):
        n = len(np.load(set_dir / "coord.npy"))
        counts["frames"] += n
        for label, name in (("energy", "energy"), ("forces", "force"), ("stress", "virial")):
            counts[label] += n if (set_dir / f"{name}.npy").is_file() else 0
    return counts


def _count_ase(path: Path, fmt: str) -> Counter:
    counts: Counter = Counter()
    for atoms in ase.io.read(path, index=":", format=fmt):
        counts["frames"] += 1
        for label in ("energy", "forces", "stress", "magmoms"):
            counts[label] += label in atoms.calc.results
    return counts


def _count_db(path: Path) -> Counter:
    counts: Counter = Counter()
    with ase.db.connect(path) as db:
        for row in db.select():
            counts["frames"] += 1
            counts["energy"] += row.get("energy") is not None
            counts["forces"] += row.get("forces") is not None
            counts["stress"] += row.get("stress") is not None
    return counts


def _count_h5(path: Path, coords: str, energy: str, forces: str) -> Counter:
    counts: Counter = Counter()

    def visit(name, obj):
        if isinstance(obj, h5py.Group) and coords in obj and energy in obj:
            e = obj[energy][()]
            counts["frames"] += len(e)
            counts["energy"] += int(np.isfinite(e).sum())
            if forces in obj:
                counts["forces"] += int(np.isfinite(obj[forces][()]).all(axis=(1, 2)).sum())

    with h5py.File(path, "r") as h5:
        h5.visititems(visit)
    return counts


def _count_mlearn(root: Path) -> Counter:
    counts: Counter = Counter()
    for file in sorted(root.rglob("*.json")):
        for rec in json.loads(file.read_text()):
            counts["frames"] += 1
            out = rec["outputs"]
            counts["energy"] += out.get("energy") is not None
            counts["forces"] += out.get("forces") is not None
            counts["stress"] += out.get("virial_stress") is not None
    return counts


FIXTURES = {
    "deepmd_water": lambda: _count_deepmd(REAL / "deepmd_water"),
    "deepmd_nopbc_cho": lambda: _count_deepmd(REAL / "deepmd_nopbc_cho"),
    "custodian_vasp_mp/Al_r2SCAN_relax": lambda: _count_ase(REAL / "custodian_vasp_mp/Al_r2SCAN_relax/vasprun.xml",
                                                            "vasp-xml"),
    "custodian_vasp_mp/FeO_PBEU_relax/OUTCAR": lambda: _count_ase(FEO / "OUTCAR", "vasp-out"),
    "custodian_vasp_mp/FeO_PBEU_relax/vasprun.xml": lambda: _count_ase(FEO / "vasprun.xml", "vasp-xml"),
    "fairchem_oxides_asedb/oxides.db": lambda: _count_db(REAL / "fairchem_oxides_asedb/oxides.db"),
    "spice_hdf5": lambda: _count_h5(REAL / "spice_hdf5/SPICE-1.1.4_n2.hdf5", "conformations", "dft_total_energy",
                                    "dft_total_gradient"),
    "ani1x_hdf5": lambda: _count_h5(REAL / "ani1x_hdf5/ani1_n5.hdf5", "coordinates", "wb97x_dz.energy",
                                    "wb97x_dz.forces"),
    "mlearn_pbe_elemental": lambda: _count_mlearn(REAL / "mlearn_pbe_elemental"),
}


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_every_reader_returns_every_label_its_fixture_holds(fixture: str) -> None:
    present = FIXTURES[fixture]()
    seen: list[ReadError] = []
    found: Counter = Counter()
    for frame in read_frames(REAL / fixture, on_error=seen.append):
        found["frames"] += 1
        for label in ("energy", "forces", "stress", "magmoms"):
            found[label] += getattr(frame, label) is not None
            if getattr(frame, label) is not None:
                assert label in frame.label_keys  # and the census can say where it came from
    assert present["frames"] > 0
    assert {k: v for k, v in found.items() if v} == {k: v for k, v in present.items() if v}
    assert seen == []  # nothing left behind to warn about, nothing unreadable


def test_unread_deepmd_arrays_are_named(tmp_path: Path) -> None:
    import shutil

    system = tmp_path / "water"
    shutil.copytree(REAL / "deepmd_water" / "data_0", system)
    frames = len(np.load(system / "set.000" / "coord.npy"))
    np.save(system / "set.000" / "atom_ener.npy", np.zeros((frames, 192)))
    seen: list[ReadError] = []
    assert len(list(read_frames(system, on_error=seen.append))) == frames
    assert [str(w) for w in seen] == [
        f"{system / 'set.000'}#0: atom_ener.npy not read (no Frame label holds them)"
    ]
    assert re.search("atom_ener", seen[0].keys[0])


@pytest.mark.parametrize("source, message", [
    ({"keys": {"force": "force"}}, "sources[0].keys: unknown key 'force'; allowed keys: energy, forces, stress"),
    ({"keys": {"stress": "s", "virial": "v"}}, "sources[0].keys: map either stress or virial, not both"),
    ({"format": "deepmd", "keys": {"forces": "f"}}, "sources[0].keys: format 'deepmd' has fixed names"),
])
def test_a_wrong_keys_entry_is_one_line_naming_it(tmp_path: Path, source: dict, message: str) -> None:
    from lampretrain.config import ConfigError

    spec = {"name": "x", "output": str(tmp_path / "out"), "sources": [{"path": str(MO), "dataset": "mo", **source}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError) as err:
        load_spec(tmp_path / "spec.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)
