"""deepmd-kit DPA4 checkpoints (fixtures written by deepmd-kit 3.2.0 itself, tests/data/deepmd_dpa4/make_fixture.py):
import reproduces deepmd-kit's energies, forces and stress; export → import keeps every weight; hostile files refused."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import ase
import numpy as np
import pytest
import torch

from lampretrain.inference import Calculator
from lampretrain.models.foreign import ForeignFormatError, get_format, import_checkpoint

DATA = Path(__file__).parent / "data" / "deepmd_dpa4"
PRED = json.loads((DATA / "predictions.json").read_text())
CASES = [(f, b) for f, entry in PRED["checkpoints"].items() for b in entry]


def read(fname: str):
    return get_format("deepmd").read(DATA / fname).model


def predictions(model, branch: str, dtype: torch.dtype):
    calc = Calculator(model, dataset=branch, dtype=dtype)
    for s in PRED["structures"]:
        atoms = ase.Atoms(numbers=s["numbers"], positions=s["positions"], cell=s["cell"], pbc=s["cell"] is not None)
        atoms.calc = calc
        stress = atoms.get_stress(voigt=False) if s["cell"] is not None else None
        yield atoms, atoms.get_potential_energy(), atoms.get_forces(), stress


@pytest.mark.parametrize("fname,branch", CASES)
def test_float64_equals_deepmd(fname, branch):
    model = read(fname).double()
    ref = PRED["checkpoints"][fname][branch]["float64"]
    for (atoms, e, f, stress), r in zip(predictions(model, branch, torch.float64), ref):
        assert abs(e - r["energy"]) <= 1e-10 * abs(r["energy"])
        fr = np.array(r["forces"])
        assert np.abs(f - fr).max() <= 1e-10 * np.abs(fr).max()
        if stress is not None:
            sr = -np.array(r["virial"]) / atoms.get_volume()  # deepmd's virial → ASE stress
            assert np.abs(stress - sr).max() <= 1e-10 * np.abs(sr).max()


@pytest.mark.parametrize("fname,branch", CASES)
def test_float32_equals_deepmd(fname, branch):
    model = read(fname)
    ref = PRED["checkpoints"][fname][branch]["float32"]
    for (atoms, e, f, stress), r in zip(predictions(model, branch, torch.float32), ref):
        n = len(atoms)
        # our float32 total carries float32 rounding of |E| (−11 keV for the molecule: 1 ulp ≈ 1e-3 eV)
        assert abs(e - r["energy"]) <= max(1e-6 * n, 2 * float(np.spacing(np.float32(abs(r["energy"])))))
        assert np.abs(f - np.array(r["forces"])).max() <= 2e-5  # forces up to ~10 eV/Å: float32 noise of both
        if stress is not None:
            assert np.abs(stress - (-np.array(r["virial"]) / atoms.get_volume())).max() <= 1e-6


def test_import_records_the_branches_and_references(tmp_path):
    out = import_checkpoint("deepmd", DATA / "multitask.ckpt.pt", tmp_path / "imported")
    record = json.loads((out / "import.json").read_text())
    assert record["format"] == "deepmd" and record["branches"] == ["cu", "cho"]
    state = torch.load(DATA / "multitask.ckpt.pt", weights_only=True)["model"]
    imported = read("multitask.ckpt.pt")
    for k, name in enumerate(["cu", "cho"]):
        bias = state[f"model.{name}.atomic_model.out_bias"][0, :, 0] + state[f"model.{name}.atomic_model.fitting_net.bias_atom_e"][:, 0]
        for t, z in enumerate((1, 6, 8, 29)):
            assert imported.references.table[k, z].item() == bias[t].item()
    calc = Calculator(out, dataset="cho")  # the directory loads as our own checkpoints do
    atoms = ase.Atoms(numbers=PRED["structures"][-1]["numbers"], positions=PRED["structures"][-1]["positions"])
    atoms.calc = calc
    e = atoms.get_potential_energy()
    assert abs(e - PRED["checkpoints"]["multitask.ckpt.pt"]["cho"]["float32"][-1]["energy"]) < 1e-2


@pytest.mark.parametrize("fname", ["model.ckpt.pt", "multitask.ckpt.pt"])
def test_export_then_import_keeps_every_weight_bitwise(fname, tmp_path):
    fmt = get_format("deepmd")
    first = read(fname)
    fmt.write(first, tmp_path / "back.pt", None)
    again = fmt.read(tmp_path / "back.pt").model
    a, b = first.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # and the written file has every tensor deepmd-kit's own checkpoint has, with the same shapes and dtypes
    theirs = torch.load(DATA / fname, weights_only=True)["model"]
    mine = torch.load(tmp_path / "back.pt", weights_only=True)["model"]
    assert set(mine) == set(theirs)
    for k, v in theirs.items():
        if k != "_extra_state":
            assert mine[k].shape == v.shape and mine[k].dtype == v.dtype, k
            if not v.dtype.is_floating_point or "padding" in k:
                assert torch.equal(mine[k], v), k


def test_export_of_one_branch_is_single_task(tmp_path):
    fmt = get_format("deepmd")
    model = read("multitask.ckpt.pt")
    fmt.write(model, tmp_path / "cho.pt", "cho")
    back = fmt.read(tmp_path / "cho.pt").model
    assert back.dataset_names == ["Default"]
    x, y = model.state_dict(), back.state_dict()
    assert all(torch.equal(x[k], y[k]) for k in x if k.startswith("backbone."))
    assert torch.equal(x["energy_heads.mlp.weights.0"][1], y["energy_heads.mlp.weights.0"][0])


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_hostile_pickle_is_refused_in_one_line(tmp_path, capsys):
    bad = tmp_path / "model.ckpt.pt"
    with open(bad, "wb") as fh:
        pickle.dump({"model": {"_extra_state": _Payload()}}, fh)
    with pytest.raises(ForeignFormatError) as err:
        get_format("deepmd").read(bad)
    assert "\n" not in str(err.value) and str(bad) in str(err.value) and "weights_only" in str(err.value)
    assert "pwned" not in capsys.readouterr().out


def test_a_setting_ours_cannot_express_is_named(tmp_path):
    state = torch.load(DATA / "model.ckpt.pt", weights_only=True)
    state["model"]["_extra_state"]["model_params"]["descriptor"]["so2_norm"] = True
    torch.save(state, tmp_path / "x.pt")
    with pytest.raises(ForeignFormatError, match=r"descriptor.so2_norm = True"):
        get_format("deepmd").read(tmp_path / "x.pt")
