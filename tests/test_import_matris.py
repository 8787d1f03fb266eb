"""Official MatRIS checkpoints in and out: `lampretrain import matris`, `export --format matris`.

The fixture (tests/data/matris_official, written by make_fixture.py with the official matris 1.0.0 code) holds a
reduced-width official checkpoint and the official calculator's predictions on bundled cells; the tests with the
installed official 0.1.0 (the `peers` extra) load what we write back.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms

from lampretrain.inference.calculator import Calculator
from lampretrain.inference.loading import load_model
from lampretrain.models import build
from lampretrain.models.foreign import ForeignFormatError, get_format, import_checkpoint

FIXTURE = Path(__file__).parent / "data" / "matris_official"
CHECKPOINT = FIXTURE / "matris_1.0.0_small.pth.tar"
PREDICTIONS = json.loads((FIXTURE / "predictions.json").read_text())
# float32: the bounds; float64: relative, the same function up to summation order
TOLERANCE = {"float32": {"energy": 1e-6, "forces": 1e-5, "stress": 1e-6, "magmoms": 1e-5}, "float64": 1e-10}


def structures() -> list[tuple[str, int, Atoms]]:
    return [
        (key, i, Atoms(numbers=s["numbers"], positions=s["positions"], cell=s["cell"], pbc=True))
        for key, items in PREDICTIONS["structures"].items()
        for i, s in enumerate(items)
    ]


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    return import_checkpoint("matris", CHECKPOINT, tmp_path_factory.mktemp("imported") / "matris-small")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_imported_model_predicts_what_the_official_calculator_does(imported, dtype):
    calc = Calculator(imported, dtype=getattr(torch, dtype))
    for key, i, atoms in structures():
        ref = PREDICTIONS[dtype][key][i]
        atoms.calc = calc
        got = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(),
               "stress": atoms.get_stress(voigt=False), "magmoms": calc.results["magmoms"]}
        if dtype == "float32":
            tol = TOLERANCE["float32"]
            assert abs(got["energy"] - ref["energy"]) / len(atoms) <= tol["energy"], key
            for name in ("forces", "stress", "magmoms"):
                assert np.abs(got[name] - np.asarray(ref[name])).max() <= tol[name], (key, name)
        else:
            for name, value in got.items():
                want = np.asarray(ref[name])
                assert np.abs(value - want).max() <= TOLERANCE["float64"] * max(np.abs(want).max(), 1.0), (key, name)


def test_import_records_the_source_and_names_the_head(imported):
    record = json.loads((imported / "import.json").read_text())
    assert record["format"] == "matris" and len(record["sha256"]) == 64
    assert record["config"]["num_layers"] == 2 and record["config"]["is_intensive"] is True
    model = load_model(imported)
    assert model.dataset_names == ["mptrj"]  # the checkpoint's reference preset
    assert model.backbone.config.smooth is False  # the published MatRIS
    refs = torch.load(CHECKPOINT, weights_only=True)["state_dict"]["reference_energy.fc.weight"][0]
    assert model.references.table[0, 29].item() == refs[28].item()  # Cu at column Z − 1, bit for bit


def test_round_trip_keeps_every_weight_bitwise(imported, tmp_path):
    out = tmp_path / "back.pth.tar"
    get_format("matris").write(load_model(imported), out, None)
    source, back = torch.load(CHECKPOINT, weights_only=True), torch.load(out, weights_only=True)
    assert set(back["state_dict"]) == set(source["state_dict"])
    for name, value in source["state_dict"].items():
        assert back["state_dict"][name].dtype == value.dtype and torch.equal(back["state_dict"][name], value), name
    assert back["config"] == source["config"]


def test_nested_layout_and_legacy_reference_key_import_the_same(tmp_path):
    source = torch.load(CHECKPOINT, weights_only=True)
    state = dict(source["state_dict"])
    state["composition_model.fc.weight"] = state.pop("reference_energy.fc.weight")
    nested = tmp_path / "nested.pth.tar"
    torch.save({"model": {"config": source["config"], "state_dict": state}, "epoch": 3}, nested)
    a = get_format("matris").read(CHECKPOINT).model.state_dict()
    b = get_format("matris").read(nested).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_release_name_resolves_through_the_cache_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMPRETRAIN_PUBLISHED", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path))  # the official loader's ~/.cache/matris is empty too
    with pytest.raises(ForeignFormatError, match=r"release not downloaded; fetch https://github.com/HPC-AI-Team/"
                       r"MatRIS/releases/download/v1.0.0/MatRIS_4M_MatPES_PBEv1.pth.tar into .*cache"):
        import_checkpoint("matris", "matris_4m_matpes_pbev1", tmp_path / "out")
    (tmp_path / "cache").mkdir()
    shutil.copy(CHECKPOINT, tmp_path / "cache" / "MatRIS_4M_MatPES_PBEv1.pth.tar")
    out = import_checkpoint("matris", "matris_4m_matpes_pbev1", tmp_path / "out")
    assert load_model(out).dataset_names == ["matpes_pbe"]


class Payload:
    def __reduce__(self):
        return (print, ("ran code from a checkpoint",))


def test_hostile_and_foreign_files_are_one_line(tmp_path):
    hostile = tmp_path / "hostile.pth.tar"
    with open(hostile, "wb") as fh:
        pickle.dump({"config": {}, "state_dict": Payload()}, fh)
    run = subprocess.run([sys.executable, "-m", "lampretrain.cli", "import", "matris", str(hostile), "--out",
                          str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 2 and "ran code" not in run.stdout
    assert run.stderr.count("\n") == 1 and "hostile.pth.tar: refused, not a plain tensor file" in run.stderr
    source = torch.load(CHECKPOINT, weights_only=True)
    sh = tmp_path / "sh.pth.tar"
    torch.save({"config": {**source["config"], "three_body_expansion": "SH"}, "state_dict": source["state_dict"]}, sh)
    with pytest.raises(ForeignFormatError, match=r"sh.pth.tar: config three_body_expansion='SH'; lampretrain's MatRIS "
                       r"implements three_body_expansion='fourier' only"):
        get_format("matris").read(sh)
    torch.save({"weights": source["state_dict"]}, tmp_path / "other.pt")
    with pytest.raises(ForeignFormatError, match="not an official MatRIS checkpoint"):
        get_format("matris").read(tmp_path / "other.pt")


def test_export_refuses_what_the_official_code_does_not_compute(tmp_path):
    with pytest.raises(ForeignFormatError, match=r"smooth MatRIS \(model.options.smooth: true\)"):
        get_format("matris").write(build("matris-4m"), tmp_path / "x.pth.tar", None)


def test_official_0_1_loads_what_we_export(imported, tmp_path):
    """The installed official 0.1.0 reads the exported file with its own from_dict and predicts what ours does."""
    pytest.importorskip("matris", reason="needs the official MatRIS (pip install -e '.[peers]')")
    from matris.model import MatRIS
    from pymatgen.io.ase import AseAtomsAdaptor

    out = tmp_path / "exported.pth.tar"
    subprocess.run([sys.executable, "-m", "lampretrain.cli", "export", str(imported), str(out), "--format", "matris"],
                   check=True, capture_output=True)
    official = MatRIS.from_dict(torch.load(out, weights_only=True)).eval()
    calc = Calculator(imported)
    for key, _, atoms in structures()[::2]:
        graph = official.graph_converter(AseAtomsAdaptor.get_structure(atoms))
        # its converter rounds coordinates to float32 from the structure: rebuild them from float64 as ours does
        graph.atom_frac_coord = torch.as_tensor(atoms.get_scaled_positions(wrap=False), dtype=torch.float64).float()
        pred = official([graph], task="efsm")
        atoms.calc = calc
        assert abs(pred["e"].item() - atoms.get_potential_energy() / len(atoms)) <= 1e-6, key
        assert np.abs(pred["f"][0].detach().numpy() - atoms.get_forces()).max() <= 1e-5, key
        assert np.abs(pred["m"][0].detach().numpy() - calc.results["magmoms"]).max() <= 1e-5, key
