"""The ASE calculator against ASE's own numerical derivatives of its energy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress

import lampretrain.models as models
from lampretrain.inference import Calculator

SMALL = dict(num_layers=2, atom_dim=16, bond_dim=12, angle_dim=8, readout_hidden=(16, 8), magmom_hidden=8)


def small_calculator(seed: int = 0) -> Calculator:
    torch.manual_seed(seed)
    model = models.build("matris-10m", **SMALL)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return Calculator(model, dtype=torch.float64)


def test_periodic_forces_and_stress_match_ase_numerical_derivatives():
    atoms = bulk("NaCl", "rocksalt", a=5.64)
    atoms.rattle(0.1, seed=1)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.02 * np.random.default_rng(2).normal(size=(3, 3))), scale_atoms=True)
    atoms.calc = small_calculator()
    energy = atoms.get_potential_energy()
    assert energy == atoms.get_potential_energy(apply_constraint=False)
    assert atoms.calc.results["free_energy"] == energy
    np.testing.assert_allclose(atoms.get_forces(), calculate_numerical_forces(atoms, eps=1e-5), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(atoms.get_stress(), calculate_numerical_stress(atoms, eps=1e-6), rtol=1e-5, atol=1e-8)
    assert atoms.get_magnetic_moments().shape == (len(atoms),)


def test_molecule_forces_and_no_stress():
    atoms = Atoms("CH3OH", positions=[[0, 0, 0], [1.09, 0, 0], [-0.36, 1.03, 0], [-0.36, -0.51, 0.89], [-0.47, -0.66, -1.17], [-1.4, -0.6, -1.1]])
    atoms.calc = small_calculator(1)
    np.testing.assert_allclose(atoms.get_forces(), calculate_numerical_forces(atoms, eps=1e-5), rtol=1e-6, atol=1e-8)
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()


def test_missing_checkpoint_path_is_named():
    with pytest.raises(FileNotFoundError, match="no-such-model.pt"):
        Calculator("no-such-model.pt")
