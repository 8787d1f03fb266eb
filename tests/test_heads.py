"""Multi-task heads on real MatRIS / DPA4 backbones: head and reference selection, vector heads, reload."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lampretrain.graph.batch import collate
from lampretrain.io import read_frames
from lampretrain.models.heads import Corruption, DenoisingConfig, StackedMLP
from lampretrain.models.multitask import DatasetSpec, HeadsConfig, MultiTaskConfig, MultiTaskModel
from lampretrain.objectives import MultiTaskObjective, ObjectiveConfig

REAL = Path(__file__).parent / "data" / "real"
F64 = torch.float64
BACKBONES = {
    "matris": ("matris-4m", dict(num_layers=1, atom_dim=16, bond_dim=8, angle_dim=8, readout_hidden=(8,), magmom_hidden=8)),
    "dpa4": ("dpa4-neo", dict(channels=8, lmax=2, n_blocks=1, so2_layers=1, ffn_hidden=16, n_radial=8, cutoff=5.0)),
}
DATASETS = [
    DatasetSpec("mp_pbeu", {8: -4.93, 26: -8.31}, energy_rms=0.05, force_rms=0.8),
    DatasetSpec("mp_r2scan", {13: -3.75}, energy_rms=0.02, force_rms=0.3),
    DatasetSpec("cho_mn15", {1: -13.6, 6: -1029.8, 8: -2043.9}, energy_rms=0.1, force_rms=1.2),
]
IDS = {d.name: k for k, d in enumerate(DATASETS)}


def first(path: Path, dataset: str):
    frame = next(iter(read_frames(path)))
    return replace(frame, dataset=dataset)


@pytest.fixture(scope="module")
def frames():
    return [
        first(REAL / "custodian_vasp_mp" / "FeO_PBEU_relax" / "vasprun.xml", "mp_pbeu"),
        first(REAL / "custodian_vasp_mp" / "Al_r2SCAN_relax" / "vasprun.xml", "mp_r2scan"),
        first(REAL / "deepmd_nopbc_cho", "cho_mn15"),
    ]


def make_model(family: str, **heads) -> MultiTaskModel:
    name, options = BACKBONES[family]
    torch.manual_seed(0)
    cfg = MultiTaskConfig(name, DATASETS, HeadsConfig(hidden=(8,), vector_hidden=8, **heads), options)
    model = MultiTaskModel(cfg).to(F64).eval()
    with torch.no_grad():  # zero-initialised residual branches would make a fresh DPA4 energy position-independent
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0.0, 0.2)
    return model


def batch_of(frames, cutoff=5.0):
    return collate(frames, dataset_ids=IDS, cutoff=cutoff, three_body_cutoff=4.0, dtype=F64)


def rotated(batch, rot: torch.Tensor):
    return replace(batch, positions=batch.positions @ rot.T, cell=batch.cell @ rot.T, forces=batch.forces @ rot.T)


def random_rotation(seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return q * torch.sign(torch.linalg.det(q))


def test_stacked_heads_equal_separate_mlps():
    torch.manual_seed(1)
    heads = StackedMLP(5, (7, 4), 1, n_heads=3).to(F64)
    x = torch.randn(11, 5, dtype=F64)
    out = heads(x)  # (11, 3, 1)
    for k in range(3):
        h = x @ heads.weights[0][k] + heads.biases[0][k]
        h = torch.nn.functional.silu(h) @ heads.weights[1][k] + heads.biases[1][k]
        h = torch.nn.functional.silu(h) @ heads.weights[2][k] + heads.biases[2][k]
        torch.testing.assert_close(out[:, k], h)


@pytest.mark.parametrize("family", ["matris", "dpa4"])
def test_mixed_batch_gives_each_graph_its_own_head_and_references(family, frames):
    model = make_model(family)
    mixed = model(batch_of(frames), compute_stress=True)
    for g, frame in enumerate(frames):
        alone = model(batch_of([frame]), compute_stress=True)
        torch.testing.assert_close(mixed["energy"][g], alone["energy"][0], rtol=0, atol=1e-9)
        rows = slice(sum(f.natoms for f in frames[:g]), sum(f.natoms for f in frames[: g + 1]))
        torch.testing.assert_close(mixed["forces"][rows], alone["forces"], rtol=0, atol=1e-9)
        torch.testing.assert_close(mixed["stress"][g], alone["stress"][0], rtol=0, atol=1e-9)
    # the selection matters: the same FeO cell under the r2SCAN head and references is another energy
    other = model(batch_of(frames[:1]), compute_forces=False, compute_stress=False, dataset="mp_r2scan")
    assert (other["energy"][0] - mixed["energy"][0]).abs() > 1.0


def test_references_are_float64_sums_per_dataset(frames):
    model = make_model("matris", per_dataset=False, output_scale="none")
    feo = batch_of(frames[:1])
    e_pbeu = model(feo, compute_forces=False, compute_stress=False, dataset="mp_pbeu")["energy"][0]
    e_scan = model(feo, compute_forces=False, compute_stress=False, dataset="mp_r2scan")["energy"][0]
    counts = torch.bincount(feo.numbers, minlength=27)
    expected = torch.tensor(int(counts[8]) * -4.93 + int(counts[26]) * -8.31, dtype=F64)  # one shared head: the difference is the references alone
    torch.testing.assert_close(e_pbeu - e_scan, expected, rtol=0, atol=1e-9)
    assert model.references.table.dtype == F64 and not model.references.table.requires_grad
    # per-dataset output scales (force RMS, clamped around the median): the shared head's learned part scales with them
    scaled = make_model("matris", per_dataset=False)
    learned = {
        name: scaled(feo, compute_forces=False, compute_stress=False, dataset=name)["energy"][0]
        - scaled.references(feo.numbers, torch.full_like(feo.numbers, scaled.dataset_index(name))).sum()
        for name in ("mp_pbeu", "mp_r2scan")
    }
    s = torch.tensor([d.force_rms for d in DATASETS], dtype=F64)  # all within 10× of their median: unclamped
    k_pbeu, k_scan = scaled.dataset_index("mp_pbeu"), scaled.dataset_index("mp_r2scan")
    torch.testing.assert_close(learned["mp_pbeu"] / learned["mp_r2scan"], s[k_pbeu] / s[k_scan], rtol=1e-6, atol=0)
    trainable = make_model("matris", trainable_references=True)
    assert trainable.references.table.dtype == F64 and trainable.references.table.requires_grad


def corruption_for(batch, seed=3, std=0.05):
    gen = torch.Generator().manual_seed(seed)
    displaced = torch.rand(batch.positions.shape[0], generator=gen) < 0.6
    sigma = torch.where(displaced, std, 0.0).to(F64)
    noise = torch.randn(batch.positions.shape, generator=gen, dtype=F64) * sigma[:, None]
    noisy = torch.zeros(batch.num_graphs, dtype=torch.bool).index_put_((batch.batch[displaced],), torch.tensor(True))
    return Corruption(noise=noise, sigma=sigma, displaced=displaced, noisy=noisy)


@pytest.mark.parametrize("family", ["matris", "dpa4"])
def test_denoising_head_rotates_with_the_structure(family, frames):
    model = make_model(family, denoising=DenoisingConfig(enabled=True, std=0.05))
    batch = batch_of([frames[0], frames[2]])
    corr = corruption_for(batch)
    out = model(batch, compute_stress=False, corruption=corr)
    assert out["noise_pred"].abs().max() > 1e-6
    torch.testing.assert_close(out["noise_target"][corr.displaced], corr.noise[corr.displaced] / 0.05)
    rot = random_rotation(7)
    corr_rot = replace(corr, noise=corr.noise @ rot.T)
    out_rot = model(rotated(batch, rot), compute_stress=False, corruption=corr_rot)
    torch.testing.assert_close(out_rot["noise_pred"], out["noise_pred"] @ rot.T, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(out_rot["energy"], out["energy"], rtol=1e-9, atol=1e-9)
    # the original forces are an input of the denoising head
    other = model(replace(batch, forces=batch.forces * 2), compute_stress=False, corruption=corr)
    assert (other["noise_pred"] - out["noise_pred"]).abs().max() > 1e-8


@pytest.mark.parametrize("family", ["matris", "dpa4"])
def test_direct_force_head_is_equivariant_and_switches_to_conservative(family, frames):
    model = make_model(family, force_mode="direct")
    batch = batch_of([frames[0], frames[2]])
    direct = model(batch, compute_stress=False)["forces"]
    rot = random_rotation(11)
    torch.testing.assert_close(model(rotated(batch, rot), compute_stress=False)["forces"], direct @ rot.T, rtol=1e-7, atol=1e-9)
    model.set_force_mode("conservative")
    forces = model(batch, compute_stress=False)["forces"]
    pos = batch.positions.clone().requires_grad_(True)
    energy = model.energy(batch, pos, batch.cell).sum()
    torch.testing.assert_close(forces, -torch.autograd.grad(energy, pos)[0])
    assert (forces - direct).abs().max() > 1e-6
    with pytest.raises(ValueError, match="direct_force_head"):
        make_model(family).set_force_mode("direct")


@pytest.mark.parametrize("family", ["matris", "dpa4"])
def test_force_loss_gradient_reaches_heads_and_backbone(family, frames):
    """Only a force term in the loss: head weights get gradients only through the double backward."""
    model = make_model(family, magmoms=True).train()
    objective = MultiTaskObjective(ObjectiveConfig(energy_weight=0, stress_weight=0, magmom_weight=0), DATASETS)
    loss, metrics = objective(model(batch_of(frames)), batch_of(frames))
    loss.backward()
    assert metrics["cho_mn15/forces_count"] == frames[2].natoms
    head_grad = model.energy_heads.mlp.weights[0].grad
    assert head_grad is not None and head_grad.abs().sum() > 0
    backbone = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert sum(float(g.abs().sum()) for g in backbone if g is not None) > 0
    assert all(p.grad is None for p in model.backbone.parameters() if not p.requires_grad)


def test_save_and_reload_then_evaluate_by_name(frames, tmp_path):
    model = make_model("dpa4", magmoms=True, denoising=DenoisingConfig(enabled=True))
    path = tmp_path / "multitask.pt"
    model.save(path)
    loaded = MultiTaskModel.load(path).eval()
    assert loaded.config == model.config
    batch = batch_of(frames[1:2])
    for name in ("mp_r2scan", "cho_mn15"):
        a = model(batch, dataset=name)
        b = loaded(batch, dataset=name)
        for key in ("energy", "forces", "stress", "magmoms"):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown dataset 'omat'"):
        loaded(batch, dataset="omat")


def test_training_mode_corrupts_the_requested_fraction(frames):
    model = make_model("matris", denoising=DenoisingConfig(enabled=True, prob=1.0, corrupt_ratio=1.0)).train()
    batch = batch_of(frames)
    out = model(batch, compute_stress=False)
    assert bool(out["noisy"].all()) and bool(out["noise_mask"].all())
    assert math.isclose(float(out["noise_target"].std()), 1.0, rel_tol=0.5)
    none = make_model("matris", denoising=DenoisingConfig(enabled=True, prob=0.0)).train()
    assert not bool(none(batch, compute_stress=False)["noisy"].any())
