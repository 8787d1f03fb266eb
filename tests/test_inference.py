"""Checkpoint loading, batched calculator, relaxation, stability classification, export and evaluate."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.db import connect
from ase.filters import FrechetCellFilter

from lampretrain.graph.batch import collate
from lampretrain.inference import Calculator
from lampretrain.inference.calculator import atoms_to_frame
from lampretrain.inference.cli import add_parser, run
from lampretrain.inference.stability import classify, energies_above_hull, relax, stability_check
from lampretrain.models.multitask import DatasetSpec, HeadsConfig, MultiTaskConfig, MultiTaskModel

OXIDES = Path(__file__).parent / "data" / "real" / "fairchem_oxides_asedb" / "oxides.db"
# short cutoffs keep relaxations fast on a shared CPU (NaCl's 2.82 Å bonds still make angles)
TINY = dict(num_layers=1, atom_dim=8, bond_dim=8, angle_dim=8, readout_hidden=(8,), magmom_hidden=8, num_radial=4,
            cutoff=4.0, three_body_cutoff=3.0)


def tiny_model(seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    refs_a = {11: -1.3, 17: -1.8, 8: -4.9, 22: -7.8, 50: -3.9}
    refs_b = {11: -0.3, 17: -0.2, 8: -1.0, 22: -2.0, 50: -1.0}
    config = MultiTaskConfig(
        backbone="matris-10m",
        datasets=[DatasetSpec("mptrj", refs_a), DatasetSpec("omat", refs_b)],
        heads=HeadsConfig(hidden=(8,), magmoms=True),
        backbone_options=TINY,
    )
    model = MultiTaskModel(config).double().eval()
    with torch.no_grad():  # stronger weights than the initialisation: forces worth relaxing
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def nacl(seed: int = 1):
    atoms = bulk("NaCl", "rocksalt", a=5.64)
    atoms.rattle(0.05, seed=seed)
    return atoms


def test_saved_model_file_and_head_selection(tmp_path):
    model = tiny_model()
    model.save(tmp_path / "model.pt")
    atoms = nacl()
    calc = Calculator(str(tmp_path / "model.pt"), dataset="omat", dtype=torch.float64)
    batch = collate([atoms_to_frame(atoms)], cutoff=4.0, three_body_cutoff=3.0, dtype=torch.float64)
    expected = model(batch, dataset="omat")
    assert (calc.cutoff, calc.three_body_cutoff) == (4.0, 3.0)  # the graph is built with the model's own cutoffs
    atoms.calc = calc
    assert atoms.get_potential_energy() == pytest.approx(float(expected["energy"][0].detach()), abs=1e-10)
    np.testing.assert_allclose(atoms.get_forces(), expected["forces"].detach().numpy(), atol=1e-10)
    s = expected["stress"][0].detach().numpy()
    np.testing.assert_allclose(atoms.get_stress(), [s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]], atol=1e-12)
    magmoms = expected["magmoms"].detach().numpy()
    assert np.abs(magmoms).max() > 0
    np.testing.assert_allclose(atoms.get_magnetic_moments(), magmoms, atol=1e-12)
    other = Calculator(model, dataset="mptrj", dtype=torch.float64)
    assert other.get_potential_energy(atoms) != pytest.approx(atoms.get_potential_energy())  # a different head
    with pytest.raises(ValueError, match="mptrj, omat"):
        Calculator(model, dataset="spice")
    with pytest.raises(ValueError, match="pass dataset="):
        Calculator(model)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_device_choice_gives_the_float64_cpu_results(device):
    model = tiny_model(2)
    reference = Calculator(model, dataset="mptrj", dtype=torch.float64).calculate_batch([nacl(3)])[0]
    calc = Calculator(model, dataset="mptrj", device=torch.device(device), dtype=torch.float32)
    assert next(calc.model.parameters()).device.type == device
    result = calc.calculate_batch([nacl(3)])[0]
    assert result["energy"] == pytest.approx(reference["energy"], rel=1e-5)
    np.testing.assert_allclose(result["forces"], reference["forces"], atol=1e-4)
    np.testing.assert_allclose(result["stress"], reference["stress"], atol=1e-5)


def test_calculate_batch_equals_one_by_one():
    calc = Calculator(tiny_model(), dataset="mptrj", dtype=torch.float64)
    structures = [nacl(1), nacl(2) * (2, 1, 1), bulk("Na", "bcc", a=4.2)]
    batched = calc.calculate_batch(structures, batch_size=2)
    for atoms, res in zip(structures, batched):
        atoms.calc = calc
        assert res["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(res["forces"], atoms.get_forces(), atol=1e-9)
        np.testing.assert_allclose(res["stress"], atoms.get_stress(), atol=1e-10)
        assert res["magmoms"].shape == (len(atoms),)


def test_relaxation_lowers_energy_and_converges():
    calc = Calculator(tiny_model(3), dataset="mptrj", dtype=torch.float64)
    atoms = bulk("NaCl", "rocksalt", a=5.64) * (2, 1, 1)
    atoms.rattle(0.3, seed=4)
    atoms.set_cell(atoms.cell.array * 1.04, scale_atoms=True)
    atoms.calc = calc
    assert np.abs(atoms.get_forces()).max() > 0.05
    result = relax(atoms, calc, fmax=0.03, steps=400)
    assert result.converged and result.fmax < 0.03
    assert result.energy < result.initial_energy
    result.atoms.calc = calc
    generalized = FrechetCellFilter(result.atoms).get_forces()  # atoms and cell degrees of freedom
    assert np.sqrt((generalized**2).sum(axis=1)).max() < 0.03


def test_hull_and_classification_on_oxide_polymorphs():
    rows = [r for r in connect(OXIDES).select() if r.formula in ("Ti2O4", "Ti4O8", "Sn2O4", "Sn4O8")]
    comps = [r.formula for r in rows]
    energies = [r.energy for r in rows]
    e_hull = energies_above_hull(comps, energies)
    for metal in ("Ti", "Sn"):  # single-composition hull: E/atom minus the lowest E/atom of that formula
        mine = np.array([metal in c for c in comps])
        per_atom = np.array([r.energy / r.natoms for r in rows])[mine]
        np.testing.assert_allclose(e_hull[mine], per_atom - per_atom.min(), atol=1e-9)
    assert classify(e_hull, e_hull)["f1"] == 1.0
    flipped = classify(e_hull, -e_hull + e_hull.max())  # most stable predicted most unstable
    assert flipped["tp"] == 0 and flipped["precision"] == 0.0


def test_stability_check_end_to_end_on_oxides():
    db = connect(OXIDES)
    picked = [next(db.select(formula=f)) for f in ("TiO2", "Ti2O4", "SnO2", "Sn2O4")]
    structures = [r.toatoms() for r in picked]
    calc = Calculator(tiny_model(5), dataset="mptrj", dtype=torch.float64)
    report = stability_check(structures, [r.energy for r in picked], calc, fmax=0.1, steps=12)
    assert report.e_hull_true.shape == (4,) and np.all(report.e_hull_true >= -1e-9)
    assert {"precision", "recall", "f1"} <= set(report.metrics)
    for r in report.relaxations:
        assert r.energy <= r.initial_energy + 1e-9


def test_evaluate_writes_table_csv_and_plots(tmp_path, capsys):
    model = tiny_model(8)
    model.save(tmp_path / "model.pt")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", str(tmp_path / "model.pt"), str(OXIDES), "--dataset", "mptrj",
                              "--max-frames", "12", "--out", str(tmp_path / "eval")])
    assert run(args) == 0
    printed = capsys.readouterr().out
    assert "mptrj" in printed and "base MAE" in printed
    with open(tmp_path / "eval" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["quantity"] for r in rows] == ["energy", "forces"]  # the oxides have no stress labels
    assert all(int(r["frames"]) == 12 for r in rows)
    forces = connect(OXIDES).get(1).forces
    assert float(rows[1]["baseline_mae"]) > 0 and np.isfinite(forces).all()
    for name in ("summary.png", "parity_mptrj.png", "errors_mptrj.png"):
        assert (tmp_path / "eval" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert args.dtype == "float32"  # the default; --float64 opts in


def test_float64_flag_and_dtype_option_agree():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["evaluate", "m.pt", "s", "--float64"]).dtype == "float64"
    assert parser.parse_args(["evaluate", "m.pt", "s", "--dtype", "float64"]).dtype == "float64"


def _predictions(true: np.ndarray, pred: np.ndarray, baseline: float, natoms: int = 2):
    from lampretrain.inference.evaluate import Predictions

    p = Predictions("set")
    for t, q in zip(true, pred):
        p.true["energy"].append(np.array([t * natoms]))
        p.pred["energy"].append(np.array([q * natoms]))
        p.natoms.append(natoms)
        p.baseline.append(baseline)
        p.n_frames += 1
    return p


def test_energy_parity_shows_the_deviation_from_the_baseline_in_meV():
    """-5.000 and -5.300 eV/atom against a -5.1 baseline: the plot shows +100 and -200 meV/atom, not -5.0 and -5.3
    on axes where a 300 meV/atom error would look like the diagonal."""
    p = _predictions(np.array([-5.0, -5.3]), np.array([-5.3, -5.0]), baseline=-5.1)
    true, pred = p.plotted("energy")
    np.testing.assert_allclose(true, [100.0, -200.0], atol=1e-9)
    np.testing.assert_allclose(pred, [-200.0, 100.0], atol=1e-9)


def test_table_marks_every_score_no_better_than_the_baseline():
    from lampretrain.inference.evaluate import WORSE, format_table, metrics_table

    good = _predictions(np.array([-5.0, -5.2]), np.array([-5.01, -5.19]), baseline=-5.1)  # 10 meV/atom vs 100
    bad = _predictions(np.array([-5.0, -5.2]), np.array([-5.3, -4.9]), baseline=-5.1)
    rows = metrics_table({"good": good, "bad": bad})
    flags = {(r["dataset"], k): r[f"{k}_worse_than_baseline"] for r in rows for k in ("mae", "rmse")}
    assert flags == {("good", "mae"): False, ("good", "rmse"): False, ("bad", "mae"): True, ("bad", "rmse"): True}
    lines = format_table(rows).splitlines()
    bad_line = next(line for line in lines if line.startswith("bad"))
    good_line = next(line for line in lines if line.startswith("good"))
    assert bad_line.count(WORSE) == 2 and WORSE not in good_line
    assert any("2 score(s) no better than the mean baseline" in line for line in lines)


def test_parity_uses_hexbin_above_a_few_thousand_values(tmp_path):
    import matplotlib.pyplot as plt

    from lampretrain.inference.evaluate import Predictions
    from lampretrain.inference.plots import HEXBIN_ABOVE, parity_panel

    rng = np.random.default_rng(0)
    for n, density in ((HEXBIN_ABOVE // 3 - 1, False), (HEXBIN_ABOVE // 3 + 1, True)):  # 3 components per atom
        p = Predictions("set")
        forces = rng.normal(size=(n, 3))
        p.true["forces"].append(forces.ravel())
        p.pred["forces"].append((forces + 0.1 * rng.normal(size=(n, 3))).ravel())
        fig, ax = plt.subplots()
        assert (parity_panel(ax, p, "forces") is not None) == density
        assert ax.get_xlim() == ax.get_ylim()  # equal axes
        plt.close(fig)


def test_evaluate_baseline_from_training_stats_and_mlflow_logging(tmp_path, capsys):
    """A one-frame validation split still gets the energy baseline of the store's training statistics."""
    import json

    from mlflow import MlflowClient

    from lampretrain.config import from_dict
    from lampretrain.prep.pipeline import prepare
    from lampretrain.prep.spec import PrepSpec

    store = tmp_path / "store"
    spec = from_dict(PrepSpec, {"name": "oxides", "output": str(store), "sources": [{"path": str(OXIDES), "dataset": "mptrj"}],
                                "split": {"val": 0.05}, "shard_size_mb": 1, "cutoff": 4.0, "three_body_cutoff": 3.0})
    prepare(spec, workers=1, progress=False)
    stats = json.loads((store / "stats.json").read_text())["mptrj"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("eval", artifact_location=str(tmp_path / "artifacts"))).info.run_id
    model = tiny_model(8)
    model.save(tmp_path / "model.pt")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", str(tmp_path / "model.pt"), str(store), "--max-frames", "1",
                              "--out", str(tmp_path / "eval"), "--mlflow-run", run_id, "--mlflow-uri", uri])
    assert run(args) == 0
    printed = capsys.readouterr().out
    assert f"{store}/stats.json [mptrj]" in printed
    rows = {r["quantity"]: r for r in csv.DictReader(open(tmp_path / "eval" / "metrics.csv"))}
    assert rows["energy"]["frames"] == "1"
    from lampretrain.graph.datasets import LmdbFrameDataset
    from lampretrain.store.index import StoreIndex

    frame = LmdbFrameDataset.from_index(StoreIndex.open(store), "val")[0]
    refs = {int(z): v for z, v in stats["element_references"].items()}
    base = sum(refs[int(z)] for z in frame.numbers) / frame.natoms + stats["residual_per_atom_mean"]
    expected = abs(frame.energy / frame.natoms - base) * 1000.0
    assert expected > 1.0  # a real, non-zero baseline for one frame (the old set-mean baseline gave 0)
    assert float(rows["energy"]["baseline_mae"]) == pytest.approx(expected, rel=1e-9)
    logged = client.get_run(run_id).data.metrics
    assert logged["eval/mptrj/baseline/energy_per_atom_mae"] == pytest.approx(expected, rel=1e-9)
    assert logged["eval/mptrj/force_component_mae"] == pytest.approx(float(rows["forces"]["mae"]), rel=1e-9)
    assert rows["forces"]["rmse_metric"] == "force_component_rmse"
    artifacts = {Path(a.path).name for a in client.list_artifacts(run_id, "evaluation")}
    assert {"metrics.csv", "metrics.txt", "metrics.json", "summary.png", "parity_mptrj.png",
            "errors_mptrj.png"} <= artifacts
    for r in rows.values():  # the flag of the table, logged per score
        for kind in ("mae", "rmse"):
            assert logged[f"eval/mptrj/{r[f'{kind}_metric']}_worse_than_baseline"] == float(
                r[f"{kind}_worse_than_baseline"] == "True")
    table = json.loads(Path(client.download_artifacts(run_id, "evaluation/metrics.json", str(tmp_path / "dl"))).read_text())
    assert table["columns"][:2] == ["dataset", "quantity"] and len(table["data"]) == 2  # energy and forces rows
