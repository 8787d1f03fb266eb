"""DPA4 backbone on real fixtures: sizes, equivariance, conservative forces and stress, batching, bf16 autocast."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from pymatgen.core import Structure

from lampretrain.frames import Frame
from lampretrain.graph.batch import collate
from lampretrain.models import build, build_backbone
from lampretrain.models.layers.spherical_harmonics import sh_degrees
from lampretrain.models.layers.wigner import WignerD, quaternion_to_matrix
from lampretrain.models.multitask import DatasetSpec, HeadsConfig, MultiTaskConfig, MultiTaskModel

REAL = Path(__file__).parent / "data" / "real"
DT = torch.float64
TINY = dict(
    channels=8, lmax=3, n_blocks=2, so2_layers=2, n_focus=2, rank=2, ffn_hidden=16, n_radial=8, cutoff=5.0,
    n_elements=30,
)


def cu_frames(indices) -> list[Frame]:
    records = json.loads((REAL / "mlearn_pbe_elemental" / "Cu" / "test.json").read_text())
    frames = []
    for k in indices:
        s = Structure.from_dict(records[k]["structure"])
        frames.append(Frame(positions=s.cart_coords, numbers=np.array(s.atomic_numbers), cell=s.lattice.matrix, pbc=True))
    return frames


def molecule_frame(system: str = "C3H3O4", index: int = 0) -> Frame:
    root = REAL / "deepmd_nopbc_cho" / system
    types = np.loadtxt(root / "type.raw", dtype=int).reshape(-1)
    type_map = (root / "type_map.raw").read_text().split()
    z = {"C": 6, "H": 1, "O": 8}
    coords = np.load(root / "set.000" / "coord.npy")[index].reshape(-1, 3)
    return Frame(positions=coords, numbers=np.array([z[type_map[t]] for t in types]))


def tiny_model(seed: int = 0, **overrides) -> torch.nn.Module:
    """A small DPA4 with every weight perturbed, so zero-initialised branches contribute."""
    torch.manual_seed(seed)
    # one small energy head in place of the single-task readout the backbone had
    config = MultiTaskConfig("dpa4-air", [DatasetSpec("default")], HeadsConfig(hidden=(8,)), {**TINY, **overrides})
    model = MultiTaskModel(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.references.table.normal_()
    return model


def rotated(frame: Frame, q: np.ndarray) -> Frame:
    cell = None if frame.cell is None else frame.cell @ q.T
    return Frame(positions=frame.positions @ q.T, numbers=frame.numbers, cell=cell, pbc=frame.pbc)


def random_rotation(seed: int) -> torch.Tensor:
    q = torch.randn(4, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return quaternion_to_matrix(q / q.norm())


@pytest.mark.parametrize(
    "name,expected", [("dpa4-neo", 1.60e6), ("dpa4-air", 2.76e6), ("dpa4-plus", 5.40e6), ("dpa4-pro", 20.91e6)]
)
def test_parameter_counts_match_the_paper(name, expected):
    backbone = build_backbone(name)
    # the paper counts its energy readout, d = x₀ + GLU-FFN(x₀), ε = GLU fitting(d): now the multi-task heads' job
    c, h = backbone.config.channels, backbone.config.ffn_channels
    readout = (c * 2 * h + h * c) + (c * 2 * h + 2 * h + h)
    n = sum(p.numel() for p in backbone.parameters()) + readout
    assert abs(n - expected) / expected < 0.01, (name, n)


def test_unknown_override_names_the_key_and_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown key 'colour'; allowed keys: channels"):
        build("dpa4-air", colour=3)


@pytest.mark.parametrize("frame", [molecule_frame(), cu_frames([4])[0]], ids=["molecule", "cu20"])
def test_features_rotate_with_wigner_d_and_energy_is_invariant(frame):
    model = tiny_model()
    q = random_rotation(7)
    a = collate([frame], cutoff=TINY["cutoff"], three_body_cutoff=0.0, dtype=DT)
    b = collate([rotated(frame, q.numpy())], cutoff=TINY["cutoff"], three_body_cutoff=0.0, dtype=DT)
    xa = model.backbone.equivariant_features(a, a.positions, a.cell)
    xb = model.backbone.equivariant_features(b, b.positions, b.cell)
    d = WignerD(TINY["lmax"]).double()(q[None])[0]
    assert (sh_degrees(TINY["lmax"]) >= 1).any() and xa[:, 1:].abs().max() > 1e-3
    assert (xb - torch.einsum("kl,nlc->nkc", d, xa)).abs().max() < 1e-10
    out_a, out_b = model(a), model(b)
    assert (out_a["energy"] - out_b["energy"]).abs().max() < 1e-10
    assert (out_b["forces"] - out_a["forces"] @ q.T).abs().max() < 1e-10
    assert out_a["forces"].abs().max() > 1e-4


def finite_difference(f, x: torch.Tensor, index, h: float = 1e-5) -> float:
    xp, xm = x.clone(), x.clone()
    xp[index] += h
    xm[index] -= h
    return (f(xp) - f(xm)).item() / (2 * h)


def test_forces_equal_finite_differences_of_the_energy_for_a_molecule():
    model = tiny_model(1)
    batch = collate([molecule_frame("C1H4O2", 3)], cutoff=TINY["cutoff"], three_body_cutoff=0.0, dtype=DT)
    forces = model(batch, compute_stress=False)["forces"]
    energy = lambda pos: model.energy(batch, pos, batch.cell).sum()  # noqa: E731
    for atom, axis in ((0, 0), (2, 1), (5, 2)):
        assert abs(-finite_difference(energy, batch.positions, (atom, axis)) - forces[atom, axis].item()) < 1e-7


def test_forces_and_stress_equal_finite_differences_for_a_periodic_cell():
    model = tiny_model(2)
    frame = cu_frames([4])[0]
    batch = collate([frame], cutoff=TINY["cutoff"], three_body_cutoff=0.0, dtype=DT)
    out = model(batch)
    energy = lambda pos: model.energy(batch, pos, batch.cell).sum()  # noqa: E731
    for atom, axis in ((0, 0), (7, 2)):
        assert abs(-finite_difference(energy, batch.positions, (atom, axis)) - out["forces"][atom, axis].item()) < 1e-7
    volume = abs(np.linalg.det(frame.cell))

    def strained_energy(eps: torch.Tensor) -> torch.Tensor:
        sym = 0.5 * (eps + eps.T)
        deform = torch.eye(3, dtype=DT) + sym
        return model.energy(batch, batch.positions @ deform, batch.cell @ deform).sum()

    for i, j in ((0, 0), (1, 2), (2, 2)):
        fd = finite_difference(strained_energy, torch.zeros(3, 3, dtype=DT), (i, j))
        assert abs(fd / volume - out["stress"][0, i, j].item()) < 1e-8
    assert out["stress"].abs().max() > 1e-5


def test_random_roll_of_the_edge_frames_changes_nothing():
    model = tiny_model(3)
    batch = collate(cu_frames([5]), cutoff=TINY["cutoff"], three_body_cutoff=0.0, dtype=DT)
    reference = model(batch)
    model.train()  # training mode draws a fresh random roll for every edge
    for _ in range(2):
        rolled = model(batch)
        assert (rolled["energy"] - reference["energy"]).abs().max() < 1e-10
        assert (rolled["forces"] - reference["forces"]).abs().max() < 1e-10


def test_a_batch_equals_each_structure_alone():
    model = tiny_model(4)
    frames = [molecule_frame("C4H3O1", 0), cu_frames([4])[0], molecule_frame("C1H4O2", 1)]
    together = model(collate(frames, cutoff=TINY["cutoff"], three_body_cutoff=0.0, dtype=DT))
    start = 0
    for k, frame in enumerate(frames):
        alone = model(collate([frame], cutoff=TINY["cutoff"], three_body_cutoff=0.0, dtype=DT))
        n = frame.natoms
        assert abs(alone["energy"][0] - together["energy"][k]) < 1e-10
        assert (alone["forces"] - together["forces"][start : start + n]).abs().max() < 1e-10
        assert (alone["stress"][0] - together["stress"][k]).abs().max() < 1e-10
        start += n


def test_bf16_autocast_inside_the_blocks_runs_and_stays_close_to_float32():
    model = tiny_model(5).float()
    batch = collate(cu_frames([4]), cutoff=TINY["cutoff"], three_body_cutoff=0.0)
    reference = model(batch)
    model.backbone.config = replace(model.backbone.config, autocast_bf16=True)
    low = model(batch)
    scale = reference["forces"].abs().max()
    assert (low["energy"] - reference["energy"]).abs().max() / reference["energy"].abs().max() < 2e-2
    assert (low["forces"] - reference["forces"]).abs().max() / scale < 5e-2
    assert (low["forces"] - reference["forces"]).abs().max() > 0  # the low-precision path really ran


def test_atomic_numbers_outside_the_table_are_a_clear_error():
    model = tiny_model(6, n_elements=8)
    batch = collate(cu_frames([4]), cutoff=TINY["cutoff"], three_body_cutoff=0.0, dtype=DT)
    with pytest.raises(ValueError, match="atomic numbers must lie in 1..8"):
        model(batch)


def test_chunked_recomputed_edge_messages_train_like_stored_ones():
    """Recomputing the per-edge messages chunk by chunk (backward and double backward), for all chunks or for
    those beyond the memory budget, leaves the energy, forces, stress and the force-loss parameter gradients
    unchanged, in training and in inference."""
    batch = collate([molecule_frame(), cu_frames([4])[0]], cutoff=TINY["cutoff"], three_body_cutoff=0.0, dtype=DT)
    assert batch.num_edges > 3 * 97
    variants = {"stored": dict(edge_chunk=0), "recomputed": dict(edge_chunk=97, edge_memory_mb=0),
                "mixed": dict(edge_chunk=97, edge_memory_mb=7)}
    outs, grads = [], []
    for name, options in variants.items():
        model = tiny_model(7, random_roll=False, **options).train()
        stored = model.backbone.blocks[0].conv.stored_edges(8)
        if name == "mixed":  # the budget keeps some chunks' graphs and recomputes the others
            assert 97 <= stored < batch.num_edges - 97
        out = model(batch)
        loss = out["energy"].pow(2).sum() + out["forces"].pow(2).sum() + out["stress"].pow(2).sum()
        grads.append(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))
        model.eval()
        if name == "mixed":
            assert 97 <= model.backbone.blocks[0].conv.stored_edges(8) < batch.num_edges - 97
        outs.append({k: v.detach() for k, v in model(batch).items()})
    for other in range(1, len(variants)):
        for key in ("energy", "forces", "stress"):
            assert (outs[0][key] - outs[other][key]).abs().max() <= 1e-12 * (outs[0][key].abs().max() + 1), key
        so2 = 0
        for name, a, b in zip(dict(tiny_model(7).named_parameters()), grads[0], grads[other]):
            assert (a is None) == (b is None), name
            if a is not None:
                assert (a - b).abs().max() <= 1e-10 * (a.abs().max() + 1e-12), name
                so2 += any(part in name for part in (".so2.", ".edge_product.", ".gates.", ".focus_")) and a.abs().max() > 0
        assert so2 >= 4


@pytest.mark.slow
def test_compiled_conservative_path_trains_through_the_force_loss_like_eager():
    """torch.compile (fullgraph, dynamic) of energy → forces → stress gives the eager parameter gradients.

    ``aot_eager`` checks the capture (Dynamo + torch.func + AOTAutograd) in a couple of minutes on
    CPU; the benchmarks use inductor.
    """
    from lampretrain.models.dpa4.compiled import CompiledConservative

    model = tiny_model(1, n_blocks=1, lmax=1, so2_layers=2, random_roll=False).float().train()
    params = [p for p in model.parameters()]
    compiled = CompiledConservative(model, backend="aot_eager")

    def grads(out):
        loss = out["energy"].pow(2).sum() + out["forces"].pow(2).sum() + 10 * out["stress"].pow(2).sum()
        return torch.autograd.grad(loss, params, allow_unused=True)

    for frames in ([molecule_frame("C1H4O2", 3), cu_frames([4])[0]], [molecule_frame("C3H3O4", 1)] + cu_frames([5])):
        batch = collate(frames, cutoff=TINY["cutoff"], three_body_cutoff=0.0)
        eager, comp = grads(model(batch)), grads(compiled(batch))
        force_only = [g for g in eager if g is not None and g.abs().max() > 0]
        assert len(force_only) > len(params) // 2
        for a, b in zip(eager, comp):
            assert (a is None) == (b is None)
            if a is not None:
                assert (a - b).abs().max() <= 1e-5 * (a.abs().max() + 1e-12)
