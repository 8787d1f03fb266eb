"""One definition per metric: the training log and validation report the same force metric, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lampretrain.graph.batch import GraphBatch
from lampretrain.models.multitask import DatasetSpec
from lampretrain.objectives import MultiTaskObjective, ObjectiveConfig
from lampretrain.objectives.metrics import (
    energy_per_atom_mae,
    energy_per_atom_rmse,
    force_component_mae,
    force_component_rmse,
    force_norm_mae,
    magmom_mae,
    stress_component_mae,
)
from lampretrain.train.validation import error_sums, metrics


def two_graph_batch(forces: torch.Tensor, forces_mask: torch.Tensor) -> GraphBatch:
    """Graph 0: atoms 0-1 of dataset 'a'; graph 1: atom 2 of dataset 'b'; no stress or magmom labels."""
    z = torch.zeros
    return GraphBatch(
        positions=z(3, 3, dtype=torch.float64), numbers=torch.ones(3, dtype=torch.long), batch=torch.tensor([0, 0, 1]),
        cell=z(2, 3, 3, dtype=torch.float64), pbc=z(2, 3, dtype=torch.bool), n_atoms=torch.tensor([2, 1]),
        dataset=torch.tensor([0, 1]), edge_index=z(2, 0, dtype=torch.long), edge_shift=z(0, 3, dtype=torch.float64),
        edge_reverse=z(0, dtype=torch.long), angle_index=z(2, 0, dtype=torch.long),
        energy=torch.tensor([1.0, 5.0], dtype=torch.float64), energy_mask=torch.tensor([True, True]),
        forces=forces, forces_mask=forces_mask, stress=z(2, 3, 3, dtype=torch.float64),
        stress_mask=torch.tensor([False, False]), magmoms=z(3, dtype=torch.float64), magmoms_mask=z(3, dtype=torch.bool),
    )


def test_training_log_and_validation_report_the_same_force_metrics():
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    target[1] = float("nan")  # an unlabelled atom's slot never reaches a metric
    mask = torch.tensor([True, False, True])
    batch = two_graph_batch(target, mask)
    out = {"energy": torch.tensor([3.0, 4.0], dtype=torch.float64),
           "forces": torch.randn(3, 3, generator=gen, dtype=torch.float64),
           "stress": torch.zeros(2, 3, 3, dtype=torch.float64)}
    datasets = [DatasetSpec("a", energy_rms=1.0, force_rms=1.0), DatasetSpec("b", energy_rms=1.0, force_rms=1.0)]
    _, logged = MultiTaskObjective(ObjectiveConfig(balancing="none"), datasets)(out, batch)
    val = metrics(error_sums(out, batch, 2), ["a", "b"])
    diff = (out["forces"] - target).numpy()
    for name, atoms in (("a", [0]), ("b", [2])):
        component = np.abs(diff[atoms]).mean()  # mean over labelled atoms and x, y, z of |ΔF|
        norm = np.linalg.norm(diff[atoms], axis=1).mean()  # mean over labelled atoms of ‖ΔF‖₂
        assert float(logged[f"{name}/force_component_mae"]) == pytest.approx(component, rel=1e-12)
        assert val[f"val/{name}/force_component_mae"] == pytest.approx(component, rel=1e-12)
        assert float(logged[f"{name}/force_norm_mae"]) == pytest.approx(norm, rel=1e-6)  # loss terms are float32
        assert val[f"val/{name}/force_norm_mae"] == pytest.approx(norm, rel=1e-12)
    energy = {"a": abs(3.0 - 1.0) / 2, "b": abs(4.0 - 5.0) / 1}
    for name, expected in energy.items():
        assert val[f"val/{name}/energy_per_atom_mae"] == expected
        assert float(logged[f"{name}/energy_per_atom_mae"]) == pytest.approx(expected, rel=1e-6)
    assert not any(k.endswith("forces_mae") or k.endswith("energy_mae") for k in [*logged, *val])


def test_norm_and_component_force_maes_differ_by_the_expected_factor():
    """3‖x‖₂/‖x‖₁ = 3 for an error along one axis, √3 along the diagonal; 2 for isotropic Gaussian errors."""
    zero = torch.zeros(2, 3, dtype=torch.float64)
    axis = torch.tensor([[0.3, 0.0, 0.0], [0.0, -0.6, 0.0]], dtype=torch.float64)
    assert float(force_component_mae(axis, zero)) == pytest.approx((0.3 + 0.6) / 6)
    assert float(force_norm_mae(axis, zero)) == pytest.approx((0.3 + 0.6) / 2)
    diagonal = torch.full((2, 3), 0.2, dtype=torch.float64)
    assert float(force_norm_mae(diagonal, zero) / force_component_mae(diagonal, zero)) == pytest.approx(3**0.5)
    gauss = torch.randn(200_000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ratio = float(force_norm_mae(gauss, torch.zeros_like(gauss)) / force_component_mae(gauss, torch.zeros_like(gauss)))
    assert ratio == pytest.approx(2.0, rel=5e-3)


def test_each_metric_matches_its_formula_by_hand():
    gen = np.random.default_rng(1)
    e_true, e_pred, n = gen.normal(size=4), gen.normal(size=4), np.array([1.0, 2.0, 5.0, 8.0])
    mask = np.array([True, True, False, True])
    t = torch.from_numpy
    assert float(energy_per_atom_mae(t(e_pred), t(e_true), t(mask), t(n))) == pytest.approx(
        np.mean(np.abs(e_pred - e_true)[mask] / n[mask]))
    assert float(energy_per_atom_rmse(t(e_pred), t(e_true), t(mask), t(n))) == pytest.approx(
        np.sqrt(np.mean(((e_pred - e_true) / n)[mask] ** 2)))
    f_true, f_pred = gen.normal(size=(5, 3)), gen.normal(size=(5, 3))
    assert float(force_component_rmse(t(f_pred), t(f_true))) == pytest.approx(np.sqrt(np.mean((f_pred - f_true) ** 2)))
    s_true, s_pred = gen.normal(size=(2, 3, 3)), gen.normal(size=(2, 3, 3))
    assert float(stress_component_mae(t(s_pred), t(s_true))) == pytest.approx(np.mean(np.abs(s_pred - s_true)))
    m_true, m_pred = gen.normal(size=6), gen.normal(size=6)
    assert float(magmom_mae(t(m_pred), t(m_true))) == pytest.approx(np.mean(np.abs(m_pred - m_true)))
    assert float(magmom_mae(t(m_pred), t(m_true), torch.zeros(6, dtype=torch.bool))) == 0.0  # nothing labelled
