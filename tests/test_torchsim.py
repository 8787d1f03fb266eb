"""The TorchSim model interface: one batch of real cells equals the ASE calculator structure by structure (both
backbones), and TorchSim's own runners (static, integrate with NVT Langevin, optimize with FIRE) run on it."""

from __future__ import annotations

import importlib
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lampretrain.errors import UserError
from lampretrain.inference import Calculator
from lampretrain.io import read_frames
from lampretrain.models.multitask import DatasetSpec, HeadsConfig, MultiTaskConfig, MultiTaskModel

try:
    import torch_sim as ts
except ImportError:
    ts = None

needs_torchsim = pytest.mark.skipif(ts is None, reason='TorchSim not installed: pip install "lampretrain[torchsim]"')

REAL = Path(__file__).parent / "data" / "real"
# short cutoffs keep the 20- and 30-atom Cu cells cheap on a shared CPU
TINY = {
    "matris-10m": dict(num_layers=1, atom_dim=8, bond_dim=8, angle_dim=8, readout_hidden=(8,), magmom_hidden=8,
                       num_radial=4, cutoff=4.0, three_body_cutoff=3.0),
    "dpa4-neo": dict(channels=8, lmax=1, n_blocks=1, so2_layers=1, n_radial=4, cutoff=4.0),
}
REFS = {1: -3.4, 6: -8.1, 8: -4.9, 29: -3.7, 50: -3.9}
CPU = torch.device("cpu")


def voigt(s: np.ndarray) -> np.ndarray:
    return np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])


@pytest.fixture(scope="module", params=["matris-10m", "dpa4-neo"])
def checkpoint(request, tmp_path_factory, one_thread) -> Path:
    """A two-head model with random weights, saved as a model file."""
    torch.manual_seed(0)
    config = MultiTaskConfig(
        backbone=request.param,
        datasets=[DatasetSpec("mptrj", REFS), DatasetSpec("omat", {k: 0.5 * v for k, v in REFS.items()})],
        heads=HeadsConfig(hidden=(8,), magmoms=request.param.startswith("matris")),
        backbone_options=TINY[request.param],
    )
    model = MultiTaskModel(config).double().eval()
    with torch.no_grad():  # away from the initialisation: forces and stress worth comparing and relaxing
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(request.param) / "model.pt"
    model.save(path)
    return path


def crystals() -> list:
    """Real cells: two mlearn Cu cells (20 and 30 atoms), two SnO2 polymorphs (6 and 12 atoms)."""
    cu = list(read_frames(REAL / "mlearn_pbe_elemental" / "Cu"))
    oxides = list(itertools.islice(read_frames(REAL / "fairchem_oxides_asedb" / "oxides.db"), 12))
    picked = [next(f for f in cu if f.natoms == n) for n in (20, 30)] + [next(f for f in oxides if f.natoms == n) for n in (6, 12)]
    return [f.to_atoms() for f in picked]


def molecules() -> list:
    return [f.to_atoms() for f in itertools.islice(read_frames(REAL / "deepmd_nopbc_cho"), 0, 6, 3)]


def assert_matches_calculator(structures, out, calc, stress=True):
    ends = np.cumsum([len(a) for a in structures])
    for g, (atoms, end) in enumerate(zip(structures, ends)):
        atoms = atoms.copy()
        atoms.calc = calc
        energy = atoms.get_potential_energy()
        assert float(out["energy"][g]) == pytest.approx(energy, rel=1e-12, abs=1e-11)
        np.testing.assert_allclose(out["forces"][end - len(atoms) : end].numpy(), atoms.get_forces(), rtol=1e-10, atol=1e-11)
        if stress:
            np.testing.assert_allclose(voigt(out["stress"][g].numpy()), atoms.get_stress(), rtol=1e-10, atol=1e-12)
        if "magmoms" in out:
            np.testing.assert_allclose(out["magmoms"][end - len(atoms) : end].numpy(), atoms.get_magnetic_moments(), atol=1e-12)


@needs_torchsim
def test_batch_equals_ase_calculator_per_structure(checkpoint):
    from lampretrain.inference.torchsim import LampretrainModel

    model = LampretrainModel(checkpoint, dataset="omat", dtype=torch.float64)
    calc = Calculator(checkpoint, dataset="omat", dtype=torch.float64)
    structures = crystals()
    state = ts.io.atoms_to_state(structures, CPU, torch.float64)
    before = state.positions.clone(), state.cell.clone()
    out = model(state)
    assert torch.equal(state.positions, before[0]) and torch.equal(state.cell, before[1])  # the state is not changed
    n = sum(len(a) for a in structures)
    assert out["energy"].shape == (4,) and out["forces"].shape == (n, 3) and out["stress"].shape == (4, 3, 3)
    assert all(v.dtype == torch.float64 and not v.requires_grad for v in out.values())
    assert ("magmoms" in out) == ("matris" in checkpoint.parent.name)
    assert np.abs(out["stress"].numpy()).max() > 1e-4  # a stress worth comparing
    assert_matches_calculator(structures, out, calc)
    # TorchSim's single-point runner reads the same outputs
    static = ts.static(state, model)
    for g, props in enumerate(static):
        assert float(props["potential_energy"]) == float(out["energy"][g])
        torch.testing.assert_close(props["stress"].reshape(3, 3), out["stress"][g], rtol=0, atol=0)
    # float32: the same numbers to float32 rounding
    single = LampretrainModel(checkpoint, dataset="omat", dtype=torch.float32)(ts.io.atoms_to_state(structures, CPU, torch.float32))
    assert single["energy"].dtype == torch.float32
    torch.testing.assert_close(single["energy"].double(), out["energy"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single["forces"].double(), out["forces"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(single["stress"].double(), out["stress"], rtol=1e-4, atol=1e-5)


@needs_torchsim
def test_molecules_have_forces_and_nan_stress(checkpoint):
    from lampretrain.inference.torchsim import LampretrainModel

    model = LampretrainModel(checkpoint, dataset="mptrj", dtype=torch.float64)
    structures = molecules()
    state = ts.io.atoms_to_state(structures, CPU, torch.float64)
    assert not state.pbc
    out = model(state)
    assert_matches_calculator(structures, out, Calculator(checkpoint, dataset="mptrj", dtype=torch.float64), stress=False)
    assert out["stress"].shape == (2, 3, 3) and torch.isnan(out["stress"]).all()  # undefined, not zero
    model.compute_stress = False
    assert "stress" not in model(state)


@needs_torchsim
def test_nvt_langevin_runs_and_its_energies_are_the_calculators(checkpoint):
    from lampretrain.inference.torchsim import LampretrainModel

    model = LampretrainModel(checkpoint, dataset="mptrj", dtype=torch.float64)
    structures = crystals()
    torch.manual_seed(5)  # the Langevin noise draws from torch's global generator
    final = ts.integrate(system=structures, model=model, integrator=ts.nvt_langevin, n_steps=4, temperature=600.0,
                         timestep=0.002, seed=5)
    start = ts.io.atoms_to_state(structures, CPU, torch.float64)
    assert final.n_systems == 4 and torch.isfinite(final.positions).all()
    assert (final.positions - start.positions).abs().max() > 1e-4  # the atoms moved
    assert (ts.calc_kT(masses=final.masses, momenta=final.momenta, system_idx=final.system_idx) > 0).all()
    # the energies and forces the integrator holds are the ASE calculator's at the final positions
    calc = Calculator(checkpoint, dataset="mptrj", dtype=torch.float64)
    assert_matches_calculator(final.to_atoms(), {"energy": final.energy, "forces": final.forces}, calc, stress=False)


@needs_torchsim
def test_fire_lowers_energy_and_forces_and_steps_as_ase_fire(checkpoint):
    from ase.optimize import FIRE

    from lampretrain.inference.torchsim import LampretrainModel

    model = LampretrainModel(checkpoint, dataset="mptrj", dtype=torch.float64)
    structures = crystals()
    for k, atoms in enumerate(structures):
        atoms.rattle(0.15, seed=k)
    initial = model(ts.io.atoms_to_state(structures, CPU, torch.float64))
    relaxed = ts.optimize(system=structures, model=model, optimizer=ts.optimizers.fire, max_steps=40,
                          steps_between_swaps=5,
                          convergence_fn=ts.generate_force_convergence_fn(0.05, include_cell_forces=False))
    assert (relaxed.energy < initial["energy"]).all()  # every structure went down hill
    # FIRE's largest force is not monotonic structure by structure; over the batch it falls well below its start
    assert relaxed.forces.norm(dim=1).max() < 0.5 * initial["forces"].norm(dim=1).max()
    # TorchSim's ASE-flavoured FIRE, batched, takes the steps ASE's FIRE takes on each structure alone
    init_fn, step_fn = ts.optimizers.fire(model, md_flavor="ase_fire")
    state = init_fn(ts.io.atoms_to_state(structures, CPU, torch.float64))
    for _ in range(4):
        state = step_fn(state)
    calc = Calculator(checkpoint, dataset="mptrj", dtype=torch.float64)
    ends = np.cumsum([len(a) for a in structures])
    for g, (atoms, end) in enumerate(zip(structures, ends)):
        atoms = atoms.copy()
        atoms.calc = calc
        FIRE(atoms, logfile=None).run(fmax=1e-9, steps=4)
        np.testing.assert_allclose(state.positions[end - len(atoms) : end].numpy(), atoms.positions, rtol=0, atol=1e-10)
        assert float(state.energy[g]) == pytest.approx(atoms.get_potential_energy(), rel=1e-12, abs=1e-11)


@needs_torchsim
def test_head_choice_follows_the_calculator(checkpoint):
    from lampretrain.inference.torchsim import LampretrainModel

    with pytest.raises(UserError, match="pass dataset= one of: mptrj, omat"):
        LampretrainModel(checkpoint)
    with pytest.raises(UserError, match="unknown dataset 'spice'; this model has: mptrj, omat"):
        LampretrainModel(checkpoint, dataset="spice")
    model = LampretrainModel(checkpoint, dataset="mptrj", weights="model")
    assert model.datasets == ["mptrj", "omat"] and model.dtype == torch.float32 and model.device == CPU
    assert model.compute_forces and model.compute_stress and model.memory_scales_with == "n_atoms_x_density"


def test_import_without_torchsim_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_sim", None)  # what `import torch_sim` meets when it is not installed
    monkeypatch.delitem(sys.modules, "lampretrain.inference.torchsim", raising=False)
    with pytest.raises(ImportError) as info:
        importlib.import_module("lampretrain.inference.torchsim")
    assert isinstance(info.value, UserError)
    message = str(info.value)
    assert "\n" not in message and 'pip install "lampretrain[torchsim]"' in message
