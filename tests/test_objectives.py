"""Masked multi-task losses, loss balancing and the denoising term, on batches of real frames."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lampretrain.graph.batch import collate
from lampretrain.io import read_frames
from lampretrain.models.multitask import DatasetSpec
from lampretrain.objectives import LossBalancer, MultiTaskObjective, ObjectiveConfig

REAL = Path(__file__).parent / "data" / "real"
DATASETS = [DatasetSpec("mp_pbeu", energy_rms=0.05, force_rms=0.8), DatasetSpec("cho_mn15", energy_rms=5.0, force_rms=80.0)]
IDS = {"mp_pbeu": 0, "cho_mn15": 1}


@pytest.fixture(scope="module")
def batch():
    feo = replace(next(iter(read_frames(REAL / "custodian_vasp_mp" / "FeO_PBEU_relax" / "vasprun.xml"))), dataset="mp_pbeu")
    cho = [replace(f, dataset="cho_mn15") for f, _ in zip(read_frames(REAL / "deepmd_nopbc_cho"), range(2))]
    assert feo.stress is not None and all(f.stress is None for f in cho)
    return collate([feo, *cho], dataset_ids=IDS, dtype=torch.float64, with_graph=False)


def predictions(batch, seed=0, scale=0.1):
    gen = torch.Generator().manual_seed(seed)

    def noisy(t):
        return (t + scale * torch.randn(t.shape, generator=gen, dtype=t.dtype)).requires_grad_(True)

    return {"energy": noisy(batch.energy), "forces": noisy(batch.forces), "stress": noisy(batch.stress)}


def test_force_term_is_the_l2_norm_mae_per_dataset(batch):
    out = predictions(batch)
    _, metrics = MultiTaskObjective(ObjectiveConfig(balancing="none"), DATASETS)(out, batch)
    diff = (out["forces"] - batch.forces).detach().numpy()
    for k, name in enumerate(["mp_pbeu", "cho_mn15"]):
        rows = (batch.dataset[batch.batch] == k).numpy()
        expected = np.linalg.norm(diff[rows], axis=1).mean()
        assert np.isclose(float(metrics[f"{name}/force_norm_mae"]), expected, rtol=1e-6)
        e = ((out["energy"] - batch.energy).abs() / batch.n_atoms)[batch.dataset == k].mean()
        assert np.isclose(float(metrics[f"{name}/energy_per_atom_mae"]), float(e.detach()), rtol=1e-6)


def test_dataset_without_stress_labels_contributes_no_stress_loss(batch):
    objective = MultiTaskObjective(ObjectiveConfig(balancing="none", stress_weight=1.0), DATASETS)
    out = predictions(batch)
    loss, metrics = objective(out, batch)
    loss.backward()
    assert float(metrics["cho_mn15/stress_count"]) == 0 and float(metrics["cho_mn15/stress_component_mae"]) == 0
    assert float(metrics["mp_pbeu/stress_count"]) == 1
    assert out["stress"].grad[1:].abs().max() == 0 and out["stress"].grad[0].abs().max() > 0
    # garbage in an unlabelled slot (the molecules' zero-filled stress) never reaches the loss
    poisoned = dict(out, stress=out["stress"].detach().clone())
    poisoned["stress"][1:] = float("nan")
    loss2, _ = objective(poisoned, batch)
    assert torch.isfinite(loss2) and torch.isclose(loss2, loss.detach())


def test_missing_energy_label_is_masked(batch):
    unlabelled = replace(batch, energy_mask=torch.tensor([True, False, True]))
    objective = MultiTaskObjective(ObjectiveConfig(balancing="none"), DATASETS)
    out = predictions(batch)
    base, metrics = objective(out, unlabelled)
    moved = dict(out, energy=out["energy"].detach() + torch.tensor([0.0, 50.0, 0.0], dtype=torch.float64))
    assert torch.isclose(objective(moved, unlabelled)[0], base)
    assert float(metrics["cho_mn15/energy_count"]) == 1


def test_static_balancing_divides_by_prep_scales(batch):
    """A dataset whose residuals are 100× larger gets a 100× smaller weight, so equal relative errors score equally."""
    datasets = [DatasetSpec("a", energy_rms=0.01, force_rms=0.5), DatasetSpec("b", energy_rms=1.0, force_rms=50.0)]
    objective = MultiTaskObjective(ObjectiveConfig(balancing="static", stress_weight=0), datasets)
    w = objective.balancer.weights()
    assert torch.allclose(w[0, :2] / w[1, :2], torch.tensor([100.0, 100.0]))
    two = replace(batch, dataset=torch.tensor([0, 1, 1]))
    out = {"energy": batch.energy.clone(), "forces": batch.forces.clone()}
    atom_b = (two.dataset[two.batch] == 1)[:, None]
    out["energy"] = out["energy"] + torch.tensor([0.01, 1.0, 1.0], dtype=torch.float64) * batch.n_atoms
    out["forces"] = out["forces"] + torch.where(atom_b, 50.0, 0.5) * torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    _, metrics = objective(out, two)
    assert np.isclose(float(metrics["a/loss"]), float(metrics["b/loss"]), rtol=1e-5)
    assert np.isclose(float(metrics["a/loss"]), 2.0, rtol=1e-5)


def test_static_scales_are_clamped_around_their_median():
    """A dataset of relaxed structures (force RMS 1000× below the others) is weighted at most R× the median one."""
    datasets = [
        DatasetSpec("relaxed", energy_rms=0.1, force_rms=0.001),
        DatasetSpec("md", energy_rms=0.1, force_rms=1.0),
        DatasetSpec("molecules", energy_rms=0.1, force_rms=2.0),
    ]
    objective = MultiTaskObjective(ObjectiveConfig(balancing="static", static_max_ratio=10.0), datasets)
    w = objective.balancer.weights()
    assert torch.allclose(w[:, 1], torch.tensor([10.0, 1.0, 0.5]))
    assert torch.allclose(w[:, 0], torch.full((3,), 10.0))  # equal scales: untouched
    exact = MultiTaskObjective(ObjectiveConfig(balancing="static", static_max_ratio=1e6), datasets)
    assert torch.isclose(exact.balancer.weights()[0, 1], torch.tensor(1000.0))
    with pytest.raises(ValueError, match="static_max_ratio"):
        ObjectiveConfig(static_max_ratio=0.5)


def test_uncertainty_weights_react_to_a_dataset_100x_the_others():
    coefficients = torch.ones(3, 2)
    balancer = LossBalancer("uncertainty", coefficients, torch.ones(3, 2))
    losses = torch.tensor([[1.0, 2.0], [100.0, 200.0], [1.0, 2.0]])
    present = torch.ones(3, 2, dtype=torch.bool)
    present[2, 1] = False  # a term without labels: its log-variance must not move
    opt = torch.optim.Adam(balancer.parameters(), lr=0.1, betas=(0.9, 0.9))
    for _ in range(200):
        opt.zero_grad()
        balancer(losses, present)[0].backward()
        opt.step()
    w = balancer.weights().detach()
    ratio = w[1] / w[0]
    assert torch.allclose(ratio, torch.full((2,), 0.01), rtol=0.1), ratio
    assert torch.allclose(w[0], 1 / losses[0], rtol=0.1)
    assert balancer.log_variance[2, 1] == 0
    with pytest.raises(ValueError, match="objective.balancing"):
        LossBalancer("gradnorm", coefficients, torch.ones(3, 2))


def test_bounded_uncertainty_starts_static_and_stays_within_its_ratio():
    """From the static weights c/s; a term whose loss → 0 gains at most R_u×, a 100× term loses at most R_u×."""
    coefficients = torch.ones(3, 2)
    scales = torch.tensor([[0.1, 1.0], [0.2, 2.0], [0.4, 4.0]])
    balancer = LossBalancer("uncertainty", coefficients, scales, max_ratio_dynamic=4.0)
    static = LossBalancer("static", coefficients, scales)
    assert torch.equal(balancer.weights(), static.weights())
    losses = torch.tensor([[1e-6, 1.0], [100.0, 1.0], [1.0, 1.0]]) * static.weights().reciprocal()
    present = torch.ones(3, 2, dtype=torch.bool)
    opt = torch.optim.Adam(balancer.parameters(), lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        balancer(losses, present)[0].backward()
        opt.step()
    ratio = (balancer.weights() / static.weights()).detach()
    assert 3.5 < ratio[0, 0] <= 4.0  # would be 10⁶ unbounded
    assert 0.25 <= ratio[1, 0] < 0.3  # would be 0.01 unbounded
    assert torch.allclose(ratio[:, 1], torch.ones(3), atol=0.05)  # at its optimum already
    with pytest.raises(ValueError, match="uncertainty_max_ratio"):
        ObjectiveConfig(balancing="uncertainty", uncertainty_max_ratio=1.0)


def test_noisy_graphs_enter_only_through_the_denoising_term(batch):
    objective = MultiTaskObjective(ObjectiveConfig(balancing="none", denoising_weight=10.0), DATASETS)
    gen = torch.Generator().manual_seed(1)
    n = batch.positions.shape[0]
    noisy = torch.tensor([False, True, False])
    mask = noisy[batch.batch] & (torch.rand(n, generator=gen) < 0.7)
    out = predictions(batch)
    out.update(
        noise_pred=torch.randn(n, 3, generator=gen, dtype=torch.float64),
        noise_target=torch.randn(n, 3, generator=gen, dtype=torch.float64),
        noise_mask=mask,
        noisy=noisy,
    )
    loss, metrics = objective(out, batch)
    moved = dict(out, energy=out["energy"].detach().clone(), forces=out["forces"].detach().clone())
    moved["energy"][1] += 30.0
    moved["forces"][batch.batch == 1] += 3.0
    assert torch.isclose(objective(moved, batch)[0], loss)
    expected = (out["noise_pred"] - out["noise_target"]).norm(dim=-1)[mask].mean()
    assert torch.isclose(metrics["denoise"], expected)
    perfect = objective(dict(out, noise_pred=out["noise_target"]), batch)[0]
    assert torch.isclose(loss - perfect, 10.0 * expected, rtol=0, atol=1e-9)
    keep = MultiTaskObjective(ObjectiveConfig(balancing="none", energy_on_noisy=True), DATASETS)
    assert not torch.isclose(keep(moved, batch)[0], keep(out, batch)[0])


def test_final_weights_follow_the_learning_rate(batch):
    """c(s) = c_f + (c − c_f)·lr/lr_peak per task (deepmd-kit's start/limit prefactors); tasks without a final
    weight keep theirs; the loss moves with the weights."""
    config = ObjectiveConfig(balancing="none", energy_weight=0.5, force_weight=10.0, final_weights={"energy": 5.0})
    objective = MultiTaskObjective(config, DATASETS)
    out = predictions(batch)
    at_peak, metrics = objective(out, batch)
    assert float(metrics["mp_pbeu/energy_weight"]) == pytest.approx(0.5)
    for fraction in (0.5, 0.0):
        objective.follow_lr(fraction)
        loss, metrics = objective(out, batch)
        energy_weight = 5.0 + (0.5 - 5.0) * fraction
        assert float(metrics["cho_mn15/energy_weight"]) == pytest.approx(energy_weight)
        assert float(metrics["cho_mn15/forces_weight"]) == pytest.approx(10.0)
        energy_terms = sum(float(metrics[f"{n}/energy_per_atom_mae"]) for n in IDS)
        assert float(loss - at_peak) == pytest.approx((energy_weight - 0.5) * energy_terms, rel=1e-5)
    with pytest.raises(ValueError, match="final_weights.magmoms: the magmoms weight is 0"):
        ObjectiveConfig(magmom_weight=0.0, final_weights={"magmoms": 1.0})
    with pytest.raises(ValueError, match="unknown task 'force'"):
        ObjectiveConfig(final_weights={"force": 1.0})


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="objective: unknown key 'energy_wieght'; allowed keys: energy_weight"):
        ObjectiveConfig.from_dict({"energy_wieght": 1.0})
    with pytest.raises(ValueError, match="dataset_weights: unknown dataset\\(s\\) omat"):
        MultiTaskObjective(ObjectiveConfig(dataset_weights={"omat": 2.0}), DATASETS)
