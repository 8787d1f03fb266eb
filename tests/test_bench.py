"""The benchmark suite: results files, summary rendering, cost-model fitting, peers side by side or skipped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lampretrain import cli
from lampretrain.bench import common, peers, summary
from lampretrain.bench.balance import mptrj_like
from lampretrain.bench.cost_fit import fit_cost
from lampretrain.bench.model_step import repeat_sequence, supercell
from lampretrain.io import read_frames

REAL = Path(__file__).parent / "data" / "real"
OXIDES = REAL / "fairchem_oxides_asedb" / "oxides.db"


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture
def oxide3(tmp_path) -> Path:
    """The first 3-atom oxide crystal of the fairchem fixture as an extxyz file."""
    import ase.io

    frame = next(f for f in read_frames(OXIDES) if f.natoms == 3)
    path = tmp_path / "oxide3.extxyz"
    ase.io.write(path, frame.to_atoms(), format="extxyz")
    return path


def test_bench_appends_printed_lines_to_results_file(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    argv = ["bench", "balance", "--ranks", "8", "--strategy", "cost", "--steps", "5", "--results", str(results)]
    assert cli.main(argv) == 0
    assert cli.main(argv[:-2] + [f"--results={results}"]) == 0
    printed = _lines(capsys.readouterr().out)
    saved = _lines(results.read_text())
    assert saved == printed and len(saved) == 2  # appended, not overwritten
    for line in saved:
        assert {"bench", "ranks", "strategy", "max_over_mean", "dropped", "machine", "date", "load1"} <= set(line)
        assert line["machine"] == common.machine_descriptor() and line["date"] == common.today()
    assert common.results_file() is None  # the CLI restores the print-only default


def test_no_save_and_default_results_path():
    rest, path = common.pop_save_options(["--model", "x", "--no-save"])
    assert rest == ["--model", "x"] and path is None
    rest, path = common.pop_save_options(["--results", "a.jsonl", "--repeat", "2"])
    assert rest == ["--repeat", "2"] and path == Path("a.jsonl")
    default = common.pop_save_options([])[1]
    assert default.parent == Path.cwd() / "benchmarks" / "results"  # where the user runs it, not the source tree
    assert default.name == f"{common.today()}-{common.machine_descriptor()}.jsonl"
    assert common._cpu_slug("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz") == "xeon-platinum-8375c"
    assert common._cpu_slug("AMD EPYC 7R13 Processor") == "epyc-7r13"


def _record(**fields) -> dict:
    return {"machine": "cpu2-xeon", "date": "2026-11-22", "load1": 3.1, **fields}


def test_summary_renders_table_and_png(tmp_path):
    model = dict(bench="model", model="matris-10m", n_structures=1, atoms=6, edges=500, angles=5268, mode="infer",
                 device="cpu", dtype="float32", compile=False, params=10443411)
    records = [
        _record(impl="lampretrain", **model, median_s_per_step=9.0, atoms_per_s=6 / 9.0, peak_rss_mb=1500.0),  # stale
        _record(impl="lampretrain", **model, median_s_per_step=4.0, atoms_per_s=1.5, peak_rss_mb=1200.0),
        _record(impl="matris-official", **model, median_s_per_step=7.2, atoms_per_s=6 / 7.2, peak_rss_mb=1300.0),
        _record(bench="model", impl="lampretrain", model="dpa4-air", n_structures=1, atoms=24, edges=2100, angles=0,
                mode="infer", device="cpu", dtype="float32", compile=False, params=2762613, median_s_per_step=0.8,
                atoms_per_s=30.0, peak_rss_mb=900.0),
        _record(bench="model", peer="deepmd-kit", skipped="not installed (deepmd): pip install x", model="dpa4-air"),
        _record(bench="prep", impl="lampretrain", workers=1, frames=2840, frames_per_s=344.0,
                frames_per_s_per_worker=344.0),
        _record(bench="prep", impl="ase-db-aselmdb", workers=1, frames=2854, frames_per_s=278.0,
                frames_per_s_per_worker=278.0),
        _record(bench="cost", impl="lampretrain", model="matris-4m", mode="train", batches=8, r2=0.95,
                seconds_per={"atoms": 0.0, "edges": 2.8e-3, "angles": 1e-5, "batch": 0.01},
                cost={"atoms": 0.0, "edges": 0.0177, "angles": 6e-5}),
    ]
    results = tmp_path / "2026-11-22-cpu2-xeon.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    text, md_path, png_path = summary.render(results)
    assert md_path == tmp_path / "2026-11-22-cpu2-xeon-summary.md" and md_path.read_text() == text
    assert "| model | matris-10m infer, 6 atoms, cpu float32 | 1.5 | matris-official | 0.8333 | atoms/s | 1.80× |" in text
    assert "| prep | frames/s per worker | 344 | ase-db-aselmdb | 278 | frames/s | 1.24× |" in text
    assert "deepmd-kit | not installed (deepmd): pip install x |" in text
    assert "| matris-4m | train | 8 | 0.95 |" in text
    assert "9 " not in text.split("## Model step")[1].split("##")[0].replace("| 9.0", "")  # the stale line is gone
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_path.stat().st_size > 10_000


def test_cost_fit_recovers_known_coefficients():
    atoms, edges, angles = mptrj_like(3000, seed=3)  # MPtrj-like counts: angles ∝ atoms·ρ², edges ∝ atoms·ρ
    true = {"atoms": 2e-4, "edges": 3e-5, "angles": 4e-6, "batch": 0.02}  # seconds per atom, edge, angle, batch
    exact = true["atoms"] * atoms + true["edges"] * edges + true["angles"] * angles + true["batch"]
    fit = fit_cost(atoms, edges, angles, exact)
    for name, value in true.items():
        assert fit["seconds_per"][name] == pytest.approx(value, rel=1e-6)
    assert fit["r2"] == pytest.approx(1.0)
    cost = fit["cost"]  # atom units: the measured structures' total cost equals their total atoms
    total = cost["atoms"] * atoms.sum() + cost["edges"] * edges.sum() + cost["angles"] * angles.sum()
    assert total == pytest.approx(atoms.sum(), rel=1e-9)

    noisy = exact * (1 + 0.02 * np.random.default_rng(0).standard_normal(exact.size))  # 2 % timing noise
    fit = fit_cost(atoms, edges, angles, noisy)
    got = fit["seconds_per"]
    assert got["edges"] == pytest.approx(true["edges"], rel=0.15)  # atoms and the intercept are nearly collinear
    assert got["angles"] == pytest.approx(true["angles"], rel=0.05)  # angles carry most of the time
    predicted = got["atoms"] * atoms + got["edges"] * edges + got["angles"] * angles + got["batch"]
    assert np.sqrt(np.mean((predicted / exact - 1) ** 2)) < 0.01  # the balancer's use: predicted step times
    assert 0.999 < fit["r2"] <= 1.0


TINY_DPA4 = ["--set", "channels=8", "--set", "lmax=1", "--set", "n_blocks=1", "--set", "so2_layers=1",
             "--set", "cutoff=4.0", "--set", "n_radial=4"]


def test_deepmd_without_interpreter_is_skipped_with_build_command(monkeypatch, tmp_path, oxide3, capsys):
    monkeypatch.delenv(peers.DEEPMD_PYTHON_ENV, raising=False)
    monkeypatch.setattr(peers, "DEEPMD_VENV_PYTHON", tmp_path / "no-venv" / "bin" / "python")
    if peers.load("deepmd-kit")[0] is not None:
        pytest.skip("deepmd-kit imports in this interpreter, which then runs the peer")
    assert cli.main(["bench", "model", "--model", "dpa4-neo", "--structures", str(oxide3), "--repeat", "1",
                     "--warmup", "0", "--no-save", *TINY_DPA4]) == 0
    ours, skip = _lines(capsys.readouterr().out)
    assert ours["impl"] == "lampretrain" and ours["atoms"] == 3 and ours["atoms_per_s"] > 0
    assert skip["peer"] == "deepmd-kit" and skip["model"] == "dpa4-neo" and skip["mode"] == "infer"
    build = peers.PEERS["deepmd-kit"].install
    assert "'deepmd-kit==3.2.0'" in build and "'torch==2.11.0'" in build
    assert build in skip["skipped"] and peers.DEEPMD_PYTHON_ENV in skip["skipped"]
    python, reason = peers.deepmd_python(str(tmp_path / "missing-python"))
    assert python is None and "missing-python is not an executable file" in reason and build in reason


def test_deepmd_side_by_side_in_its_own_interpreter(tmp_path, capsys):
    python, reason = peers.deepmd_python()
    if python is None:
        pytest.skip(f"no deepmd-kit 3.2.0 interpreter; build one with: {peers.PEERS['deepmd-kit'].install}")
    import ase.io

    molecule = next(f for f in read_frames(REAL / "deepmd_nopbc_cho") if f.natoms >= 5)  # no cell: forces ≠ 0
    crystal = next(f for f in read_frames(OXIDES) if f.natoms == 3)
    structures = tmp_path / "mixed.extxyz"
    ase.io.write(structures, [molecule.to_atoms(), crystal.to_atoms()], format="extxyz")
    assert cli.main(["bench", "model", "--model", "dpa4-neo", "--structures", str(structures), "--mode", "train",
                     "--repeat", "1", "--warmup", "0", "--threads", "1", "--no-save", *TINY_DPA4]) == 0
    ours, peer = _lines(capsys.readouterr().out)
    assert ours["atoms"] == molecule.natoms + 3 and ours["n_structures"] == 2
    assert peer["impl"] == "deepmd-kit" and peer["peer_python"] == python
    assert peer["versions"]["deepmd-kit"] == "3.2.0"
    assert peer["type_map"] == sorted({"O", "Sn"} | {s for s in molecule.to_atoms().get_chemical_symbols()})
    for key in ("model", "n_structures", "atoms", "mode", "device", "dtype", "threads"):
        assert peer[key] == ours[key]
    assert peer["edges"] == ours["edges"]  # the same directed pairs within the 4 Å cutoff
    # our --set options reach its descriptor
    config = peer["descriptor"]
    assert (config["channels"], config["lmax"], config["n_blocks"], config["mixing_layers"], config["rcut"],
            config["n_radial"]) == (8, 1, 1, 1, 4.0, 4)
    assert peer["ratio"] == pytest.approx(ours["atoms_per_s"] / peer["atoms_per_s"])
    assert peer["memory_ratio"] == pytest.approx(ours["peak_rss_mb"] / peer["peak_rss_mb"])
    assert peer["atoms_per_s"] == pytest.approx(ours["atoms"] / peer["median_s_per_step"])
    assert peer["max_abs_force_first"] > 1e-6  # its random weights make forces depend on them: a real force loss


def test_official_matris_side_by_side(oxide3, capsys):
    pytest.importorskip("matris", reason="the official MatRIS peer is optional: pip install 'lampretrain[peers]'")
    small = ["--set", "num_layers=1", "--set", "atom_dim=16", "--set", "bond_dim=16", "--set", "angle_dim=16",
             "--set", "readout_hidden=[16]", "--set", "magmom_hidden=32", "--set", "cutoff=4.0",
             "--set", "three_body_cutoff=3.0"]
    assert cli.main(["bench", "model", "--model", "matris-4m", "--structures", str(oxide3), "--repeat", "1",
                     "--warmup", "0", "--no-save", *small]) == 0
    ours, official = _lines(capsys.readouterr().out)
    assert official["impl"] == "matris-official"
    # the same hyper-parameters give the same parameter count (its magmom head is fixed at 2·atom_dim wide)
    assert official["params"] == ours["params"]
    for key in ("atoms", "edges", "angles", "mode", "model"):
        assert official[key] == ours[key]
    assert official["ratio"] == pytest.approx(ours["atoms_per_s"] / official["atoms_per_s"])


def test_supercell_matches_ase_repeat_and_sequence_grows():
    frame = next(f for f in read_frames(OXIDES) if f.natoms == 6)
    big = supercell(frame, (3, 1, 2))
    atoms = frame.to_atoms().repeat((3, 1, 2))
    np.testing.assert_allclose(big.positions, atoms.positions, atol=1e-12)
    np.testing.assert_allclose(big.cell, atoms.cell.array, atol=1e-12)
    np.testing.assert_array_equal(big.numbers, atoms.numbers)
    np.testing.assert_allclose(big.forces, np.tile(frame.forces, (6, 1)))
    assert big.energy == pytest.approx(6 * frame.energy)
    sizes = [int(np.prod(r)) for r in repeat_sequence(5)]
    assert sizes[0] == 1 and sizes[-1] == 125 and all(b > a for a, b in zip(sizes, sizes[1:]))
