"""MatRIS backbone: parameter count, symmetries, conservative forces/stress, batching, edge cases, checkpointing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.db import connect
from pymatgen.core import Structure

import lampretrain.models as models
from lampretrain.frames import Frame
from lampretrain.graph.batch import collate
from lampretrain.models.layers.mlp import GatedMLP, gather_sum
from lampretrain.models.layers.scatter import (
    Segments,
    gather,
    scatter_max,
    scatter_sum,
    segment_max,
    segment_softmax,
    segment_sum,
)
from lampretrain.models.matris import MatRISConfig
from lampretrain.models.multitask import MultiTaskModel

REAL = Path(__file__).parent / "data" / "real"
F64 = torch.float64
SMALL = dict(num_layers=2, atom_dim=16, bond_dim=12, angle_dim=8, readout_hidden=(16, 8), magmom_hidden=8)


def cu_frame(natoms: int) -> Frame:
    records = json.loads((REAL / "mlearn_pbe_elemental" / "Cu" / "test.json").read_text())
    rec = next(r for r in records if r["num_atoms"] == natoms)
    s = Structure.from_dict(rec["structure"])
    return Frame(positions=s.cart_coords, numbers=s.atomic_numbers, cell=s.lattice.matrix, pbc=True)


def oxide_frame(row_id: int = 1) -> Frame:
    atoms = connect(REAL / "fairchem_oxides_asedb" / "oxides.db").get_atoms(id=row_id)
    return Frame(positions=atoms.positions, numbers=atoms.numbers, cell=atoms.cell.array, pbc=atoms.pbc)


def molecule_frame(system: str = "C3H3O4") -> Frame:
    folder = REAL / "deepmd_nopbc_cho" / system
    type_map = (folder / "type_map.raw").read_text().split()
    types = np.loadtxt(folder / "type.raw", dtype=int)
    symbols = [type_map[t] for t in types]
    from ase.data import atomic_numbers

    coords = np.load(folder / "set.000" / "coord.npy")[0].astype(np.float64).reshape(-1, 3)
    return Frame(positions=coords, numbers=[atomic_numbers[s] for s in symbols])


def small_model(seed: int = 0, **overrides) -> MultiTaskModel:
    """A small float64 model with every parameter perturbed, so no symmetry of the initial weights hides a bug."""
    torch.manual_seed(seed)
    model = models.build("matris-10m", **{**SMALL, **overrides}).to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def run(model: MultiTaskModel, frames, **kw):
    return model(collate(frames, dtype=F64), **kw)


def test_parameter_count_of_released_sizes():
    big = models.build("matris-10m")
    trainable = sum(p.numel() for p in big.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in big.parameters() if not p.requires_grad)
    assert (trainable, frozen) == (10_443_411, 0)  # the element references are a float64 buffer
    parts = {name: sum(p.numel() for p in child.parameters()) for name, child in big.backbone.named_children()}
    assert parts == {
        "atom_embedding": 28_416,
        "bond_embedding": 33_934,
        "angle_embedding": 17_283,
        "blocks": 10 * 1_024_768,
        "readout_norm": 256,
    }
    # the released heads, as build()'s default heads: energy MLP 128-256-128 and magmom MLP 256
    assert sum(p.numel() for p in big.energy_heads.parameters()) == 82_561
    assert sum(p.numel() for p in big.magmom_head.parameters()) == 33_281
    four = models.build("matris-4m")
    assert sum(p.numel() for p in four.parameters() if p.requires_grad) == 10_443_411 - 6 * 1_024_768


def test_unknown_override_names_key_and_allowed_options():
    with pytest.raises(ValueError, match="unknown key 'width'; allowed keys: num_layers"):
        models.build("matris-10m", width=64)
    with pytest.raises(ValueError, match="norm.*allowed: layer, rms"):
        MatRISConfig(norm="batch")


def test_gated_mlp_parts_equal_concatenation():
    torch.manual_seed(0)
    mlp = GatedMLP((3, 5, 4), 6, 7).to(F64)
    x = [torch.randn(9, d, dtype=F64) for d in (3, 5, 4)]
    split = mlp.head(sum(mlp.project(k, part, bias=k == 1) for k, part in enumerate(x)))
    torch.testing.assert_close(split, mlp(*x), rtol=1e-12, atol=1e-12)
    # per-node parts gathered to 9 edges, the edge's own part accumulated by the product
    nodes = [torch.randn(4, d, dtype=F64) for d in (5, 4)]
    index = [torch.randint(0, 4, (9,)) for _ in nodes]
    terms = [(mlp.project(1, nodes[0], bias=True), Segments(index[0], 4)), (mlp.project(2, nodes[1]), Segments(index[1], 4))]
    pre = gather_sum(terms).addmm_(x[0], mlp.part_weight(0).t())
    torch.testing.assert_close(mlp.head(pre), mlp(x[0], nodes[0][index[0]], nodes[1][index[1]]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_segment_softmax_matches_dense_softmax_and_is_stable(dtype):
    torch.manual_seed(0)
    index = torch.tensor([0, 2, 0, 2, 2, 3, 0])
    logits = (torch.randn(7, 4) * 30 + 500).to(dtype)  # exp would overflow without the max shift
    alpha = segment_softmax(logits, index, 5)
    assert torch.isfinite(alpha).all()
    for k in (0, 2, 3):
        sel = index == k
        torch.testing.assert_close(alpha[sel], torch.softmax(logits[sel], dim=0))
    torch.testing.assert_close(
        torch.zeros(5, 4, dtype=dtype).index_add_(0, index, alpha)[[0, 2, 3]], torch.ones(3, 4, dtype=dtype)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_segments_sum_and_gather_equal_index_add_to_second_order(dtype):
    torch.manual_seed(2)
    index = torch.tensor([3, 0, 3, 1, 3, 0, 1, 1, 3])  # segment 2 and 4 empty
    segments = Segments(index, 5)
    x = torch.randn(9, 2, 3, dtype=dtype)
    assert torch.equal(segment_sum(x, segments), scatter_sum(x, index, 5))  # same order of additions
    y = torch.randn(5, 3, dtype=dtype)
    assert torch.equal(gather(y, segments), y[index])
    assert torch.equal(segment_max(x, segments), scatter_max(x, index, 5))  # −inf in the empty segments
    x64, y64 = torch.randn(9, 3, dtype=F64, requires_grad=True), torch.randn(5, 3, dtype=F64, requires_grad=True)
    f = lambda a, b: segment_sum(a * gather(b, segments), segments) ** 2  # noqa: E731
    assert torch.autograd.gradgradcheck(f, (x64, y64))
    ref = lambda a, b: scatter_sum(a * b[index], index, 5) ** 2  # noqa: E731
    for got, want in zip(torch.autograd.grad(f(x64, y64).sum(), (x64, y64)), torch.autograd.grad(ref(x64, y64).sum(), (x64, y64))):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_separable_aggregate_equals_softmax_weighted_sums(dtype):
    from lampretrain.models.matris.attention import separable_aggregate

    torch.manual_seed(1)
    target = torch.tensor([0, 0, 1, 3, 3, 3])
    source = torch.tensor([1, 3, 0, 0, 1, 1])
    message = torch.randn(6, 3).to(dtype)
    logits = (torch.randn(6, 6) * 20 + 300).to(dtype)  # overflows exp without the per-segment max
    a_t, a_s = separable_aggregate(message, logits[:, :3], logits[:, 3:], Segments(target, 5), Segments(source, 5))
    zero = torch.zeros(5, 3, dtype=dtype)
    ref_t = zero.index_add(0, target, segment_softmax(logits[:, 3:], target, 5) * message)
    ref_s = zero.index_add(0, source, segment_softmax(logits[:, :3], source, 5) * message)
    torch.testing.assert_close(a_t, ref_t)
    torch.testing.assert_close(a_s, ref_s)
    assert torch.all(a_t[[2, 4]] == 0) and torch.all(a_s[[2, 4]] == 0)


def rotation(seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


def test_energy_invariances_periodic():
    model = small_model()
    frame = oxide_frame(10)
    e0 = run(model, [frame], compute_forces=False, compute_stress=False)["energy"]
    rot = rotation(1)
    rotated = Frame(positions=frame.positions @ rot.T, numbers=frame.numbers, cell=frame.cell @ rot.T, pbc=True)
    shifted = Frame(positions=frame.positions + [0.3, -1.7, 2.2], numbers=frame.numbers, cell=frame.cell, pbc=True)
    perm = np.random.default_rng(2).permutation(frame.natoms)
    permuted = Frame(positions=frame.positions[perm], numbers=frame.numbers[perm], cell=frame.cell, pbc=True)
    images = np.random.default_rng(3).integers(-2, 3, size=(frame.natoms, 3))
    imaged = Frame(positions=frame.positions + images @ frame.cell, numbers=frame.numbers, cell=frame.cell, pbc=True)
    out = run(model, [rotated, shifted, permuted, imaged], compute_forces=False, compute_stress=False)["energy"]
    torch.testing.assert_close(out, e0.expand(4), rtol=1e-10, atol=0)

    reps = (2, 1, 1)
    sc = Frame(
        positions=np.concatenate([frame.positions, frame.positions + frame.cell[0]]),
        numbers=np.tile(frame.numbers, 2),
        cell=frame.cell * np.array(reps)[:, None],
        pbc=True,
    )
    e_sc = run(model, [sc], compute_forces=False, compute_stress=False)["energy"]
    torch.testing.assert_close(e_sc, 2 * e0, rtol=1e-10, atol=0)


def test_energy_invariances_molecule_and_force_equivariance():
    model = small_model(1)
    frame = molecule_frame()
    ref = run(model, [frame], compute_stress=False)
    rot = rotation(5)
    moved = Frame(positions=frame.positions @ rot.T + [4.0, -2.0, 1.0], numbers=frame.numbers)
    out = run(model, [moved], compute_stress=False)
    torch.testing.assert_close(out["energy"], ref["energy"], rtol=1e-10, atol=0)
    torch.testing.assert_close(out["forces"], ref["forces"] @ torch.from_numpy(rot).T, rtol=1e-8, atol=1e-10)


def frame_energy(model: MultiTaskModel, frame: Frame, positions: np.ndarray, cell: np.ndarray | None) -> float:
    moved = Frame(positions=positions, numbers=frame.numbers, cell=cell, pbc=frame.pbc)
    return run(model, [moved], compute_forces=False, compute_stress=False)["energy"].item()


def finite_difference_forces(model: MultiTaskModel, frame: Frame, h: float = 1e-5) -> np.ndarray:
    forces = np.zeros_like(frame.positions)
    for a in range(frame.natoms):
        for k in range(3):
            d = np.zeros_like(frame.positions)
            d[a, k] = h
            plus = frame_energy(model, frame, frame.positions + d, frame.cell)
            minus = frame_energy(model, frame, frame.positions - d, frame.cell)
            forces[a, k] = -(plus - minus) / (2 * h)
    return forces


def test_forces_and_stress_equal_finite_differences_periodic():
    """Central differences of E along random displacements and random symmetric strains."""
    model = small_model(2)
    frame = oxide_frame(10)
    out = run(model, [frame])

    def energy(positions, cell):
        return frame_energy(model, frame, positions, cell)

    rng = np.random.default_rng(7)
    h = 1e-5
    for _ in range(3):
        d = rng.normal(size=frame.positions.shape)
        slope = (energy(frame.positions + h * d, frame.cell) - energy(frame.positions - h * d, frame.cell)) / (2 * h)
        np.testing.assert_allclose(-slope, (out["forces"].detach().numpy() * d).sum(), rtol=1e-7, atol=1e-9)
    volume = abs(np.linalg.det(frame.cell))
    for _ in range(3):
        eps = rng.normal(size=(3, 3))
        eps = (eps + eps.T) / 2
        plus, minus = np.eye(3) + h * eps, np.eye(3) - h * eps
        slope = (
            energy(frame.positions @ plus, frame.cell @ plus) - energy(frame.positions @ minus, frame.cell @ minus)
        ) / (2 * h)
        np.testing.assert_allclose(slope / volume, (out["stress"][0].detach().numpy() * eps).sum(), rtol=1e-7, atol=1e-9)


def test_forces_equal_finite_differences_molecule():
    model = small_model(3)
    frame = molecule_frame("C4H3O1")
    out = run(model, [frame])
    forces = finite_difference_forces(model, frame)
    np.testing.assert_allclose(out["forces"].detach().numpy(), forces, rtol=1e-6, atol=1e-8)
    assert torch.all(out["stress"] == 0)


def test_batch_equals_each_structure_alone():
    model = small_model(4)
    dimer = Frame(positions=[[0, 0, 0], [0, 0, 1.2]], numbers=[1, 1])  # no angles at all
    frames = [oxide_frame(10), molecule_frame(), dimer, oxide_frame(20)]
    together = run(model, frames)
    alone = [run(model, [f]) for f in frames]
    torch.testing.assert_close(together["energy"], torch.cat([o["energy"] for o in alone]), rtol=1e-10, atol=1e-12)
    for key in ("forces", "magmoms"):
        torch.testing.assert_close(together[key], torch.cat([o[key] for o in alone]), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(together["stress"], torch.cat([o["stress"] for o in alone]), rtol=1e-9, atol=1e-12)


def test_edge_cases_no_angles_lonely_atom_and_one_atom_cell():
    model = small_model(5)
    # the O atom at 5.6 Å has bonds (< 6 Å) but none within the three-body cutoff; the far H has no neighbour at all
    lonely = Frame(positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0], [5.6, 0, 0], [30.0, 0, 0]], numbers=[8, 1, 1, 8, 1])
    batch = collate([lonely], dtype=F64)
    assert batch.num_angles > 0 and not (batch.edge_index[0] == 4).any()
    out = model(batch)
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()
    assert torch.all(out["forces"][4] == 0)
    forces = finite_difference_forces(model, lonely)
    np.testing.assert_allclose(out["forces"].detach().numpy(), forces, rtol=1e-6, atol=1e-8)
    # the lone atom's energy does not depend on the others: it equals a structure holding it alone
    far = Frame(positions=[[30.0, 0, 0]], numbers=[1])
    near = Frame(positions=lonely.positions[:4], numbers=lonely.numbers[:4])
    parts = run(model, [near, far])["energy"]
    torch.testing.assert_close(out["energy"], parts.sum().reshape(1), rtol=1e-10, atol=0)

    dimer = collate([Frame(positions=[[0, 0, 0], [0, 0, 1.5]], numbers=[6, 8])], dtype=F64)
    assert dimer.num_angles == 0 and dimer.num_edges == 2
    out = model(dimer)
    torch.testing.assert_close(out["forces"].sum(0), torch.zeros(3, dtype=F64), atol=1e-12, rtol=0)

    cu = Frame(positions=[[0, 0, 0]], numbers=[29], cell=[[0, 1.8, 1.8], [1.8, 0, 1.8], [1.8, 1.8, 0]], pbc=True)
    out = run(model, [cu])
    torch.testing.assert_close(out["forces"], torch.zeros(1, 3, dtype=F64), atol=1e-10, rtol=0)
    stress = out["stress"][0]
    torch.testing.assert_close(stress, stress.T)
    # cubic symmetry of fcc: isotropic stress
    torch.testing.assert_close(torch.diagonal(stress), stress[0, 0].expand(3), rtol=1e-8, atol=1e-12)
    sc = Frame(positions=[[0, 0, 0], [1.8, 1.8, 0]], numbers=[29, 29], cell=[[0, 1.8, 1.8], [1.8, 0, 1.8], [3.6, 3.6, 0]], pbc=True)
    torch.testing.assert_close(run(model, [sc])["energy"], 2 * out["energy"], rtol=1e-10, atol=0)


def test_line_graph_checkpointing_matches_plain_with_double_backward():
    frames = [oxide_frame(10), molecule_frame()]
    batch = collate(frames, dtype=F64)
    results = []
    for limit in (None, 0):
        model = small_model(6, checkpoint_angles=limit).train()
        out = model(batch)
        loss = (out["forces"] ** 2).sum() + out["energy"].sum() + (out["stress"] ** 2).sum()
        names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
        grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
        # energy alone: the recomputing backward runs without a force graph
        energy = model(batch, compute_forces=False, compute_stress=False)["energy"].sum()
        energy_grads = torch.autograd.grad(energy, params, allow_unused=True, materialize_grads=True)
        results.append((out, grads, energy_grads))
    (plain, g_plain, e_plain), (ckpt, g_ckpt, e_ckpt) = results
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(ckpt[key], plain[key], rtol=1e-12, atol=1e-14)
    for a, b in zip(e_ckpt, e_plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    for a, b in zip(g_ckpt, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    # the last block's angle update feeds nothing, as in the official model
    dead = f"backbone.blocks.{SMALL['num_layers'] - 1}.line_refinement.edge_"
    line = [g for n, g in zip(names, g_plain) if ".line_" in n and not n.startswith(dead)]
    assert line and all(g.abs().sum() > 0 for g in line)


def test_node_features_and_float32():
    model = small_model(7).float()
    batch = collate([oxide_frame(10)], dtype=torch.float32)
    feats, vectors = model.backbone.node_features(batch, batch.positions, batch.cell)
    assert feats.shape == (6, SMALL["atom_dim"]) and feats.dtype == torch.float32 and vectors is None
    out = model(batch)
    ref = small_model(7)(collate([oxide_frame(10)], dtype=F64))
    torch.testing.assert_close(out["energy"].double(), ref["energy"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["forces"].double(), ref["forces"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_benchmark_prints_our_line_and_the_peers(tmp_path, capsys, mode):
    from ase.io import write

    from lampretrain.bench import model_step as bench
    structures = tmp_path / "two.extxyz"
    write(structures, [oxide_frame(10).to_atoms(), molecule_frame("C4H3O1").to_atoms()])
    sets = [f"--set={k}={list(v) if isinstance(v, tuple) else v}" for k, v in SMALL.items()]
    argv = ["--model", "matris-10m", "--structures", str(structures), "--mode", mode, "--repeat", "1", "--warmup", "0"]
    result = bench.run(argv + sets + ["--json-out", str(tmp_path / "out.json")])
    ours, peer = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert ours == result
    assert [ours, peer] == [json.loads(line) for line in (tmp_path / "out.json").read_text().splitlines()]
    # the official peer only takes periodic cells (installed) or is not there: reported as skipped, never timed
    assert peer == {"bench": "model", "peer": "matris-official", "skipped": peer["skipped"], "model": "matris-10m",
                    "mode": mode}
    assert "needs a periodic cell" in peer["skipped"] or peer["skipped"].startswith("not installed")
    assert list(result) == [
        "bench", "impl", "model", "n_structures", "atoms", "edges", "angles", "mode", "device", "dtype", "compile",
        "per_structure", "options", "threads", "malloc_mmap_threshold_mb", "params", "median_s_per_step", "atoms_per_s", "peak_rss_mb",
    ]
    # the --set overrides, and the published (non-smooth) MatRIS the official peer computes
    assert result["options"] == {**{k: list(v) if isinstance(v, tuple) else v for k, v in SMALL.items()}, "smooth": False}
    batch = collate([oxide_frame(10), molecule_frame("C4H3O1")])
    assert (result["n_structures"], result["atoms"], result["edges"], result["angles"]) == (
        2, 14, batch.num_edges, batch.num_angles
    )
    assert result["mode"] == mode and result["median_s_per_step"] > 0
