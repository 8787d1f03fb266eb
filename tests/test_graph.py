"""Neighbor lists, bond pairs and flat batches against ASE and brute force on the real fixtures."""

from __future__ import annotations

import json
from itertools import permutations
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from ase.neighborlist import neighbor_list as ase_neighbor_list

from lampretrain.frames import BOHR_TO_ANGSTROM, Frame
from lampretrain.graph.batch import build_graph, collate, edge_vectors, pack
from lampretrain.neighbors import neighbor_list

REAL = Path(__file__).parent / "data" / "real"
CUTOFF, THREE_BODY = 6.0, 4.5


def _mlearn(element: str, groups: tuple[str, ...]) -> list[Frame]:
    from pymatgen.core import Structure

    out = []
    for rec in json.loads((REAL / "mlearn_pbe_elemental" / element / "test.json").read_text()):
        if rec["group"] in groups:
            s = Structure.from_dict(rec["structure"])
            out.append(Frame(s.cart_coords, s.atomic_numbers, s.lattice.matrix, [True] * 3, source=f"{element}/{rec['group']}"))
    return out


def _vasprun(name: str) -> Frame:
    from ase.io import read

    atoms = read(REAL / "custodian_vasp_mp" / name / "vasprun.xml", index=0)
    return Frame(atoms.positions, atoms.numbers, np.array(atoms.cell), atoms.pbc, source=name)


def _oxides(every: int = 30) -> list[Frame]:
    from ase.db import connect

    rows = list(connect(REAL / "fairchem_oxides_asedb" / "oxides.db").select())[::every]
    return [Frame(r.positions, r.numbers, np.array(r.cell), r.pbc, source=f"oxides#{r.id}") for r in rows]


def _deepmd(system: Path, frames: int, periodic: bool) -> list[Frame]:
    types = np.loadtxt(system / "type.raw", dtype=int, ndmin=1)
    type_map = (system / "type_map.raw").read_text().split()
    from ase.data import atomic_numbers

    numbers = np.array([atomic_numbers[type_map[t]] for t in types])
    coords = np.load(system / "set.000" / "coord.npy")[:frames].reshape(frames, -1, 3)
    boxes = np.load(system / "set.000" / "box.npy")[:frames].reshape(frames, 3, 3) if periodic else [None] * frames
    return [Frame(c, numbers, b, [periodic] * 3, source=f"{system.name}#{k}") for k, (c, b) in enumerate(zip(coords, boxes))]


def _spice() -> list[Frame]:
    out = []
    with h5py.File(REAL / "spice_hdf5" / "SPICE-1.1.4_n2.hdf5", "r") as f:
        for name, group in f.items():
            numbers = group["atomic_numbers"][()]
            for k in (0, 1):
                out.append(Frame(group["conformations"][k] * BOHR_TO_ANGSTROM, numbers, source=f"{name}#{k}"))
    return out


def real_frames() -> dict[str, list[Frame]]:
    """A few structures of every fixture kind: bulk, slabs with vacuum, a 1-atom cell, oxides, molecules, water."""
    return {
        "mlearn_bulk": _mlearn("Mo", ("Ground", "Elastic"))[:2] + _mlearn("Si", ("Ground", "Vacancy"))[:2],
        "mlearn_slab": _mlearn("Ni", ("Surface",))[:2] + _mlearn("Li", ("Surface",))[:1],
        "al_one_atom": [_vasprun("Al_r2SCAN_relax")],
        "feo": [_vasprun("FeO_PBEU_relax")],
        "oxides": _oxides(),
        "spice": _spice(),
        "cho_molecules": _deepmd(REAL / "deepmd_nopbc_cho" / "C3H3O4", 2, False),
        "water": _deepmd(REAL / "deepmd_water" / "data_0", 1, True),
    }


FRAMES = real_frames()
ALL = [f for group in FRAMES.values() for f in group]


def _ase_edges(frame: Frame, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    atoms = frame.to_atoms()
    i, j, s, d = ase_neighbor_list("ijSd", atoms, cutoff)
    rows = np.column_stack([i, j, s]).astype(np.int64)
    order = np.lexsort(rows.T[::-1])
    return rows[order], d[order]


def test_fixture_kinds_present():
    assert all(FRAMES.values())
    al = FRAMES["al_one_atom"][0]
    assert al.natoms == 1  # the tiny cell: every neighbor is an image of atom 0
    assert any(f.source.startswith("Ni/Surface") for f in FRAMES["mlearn_slab"])


@pytest.mark.parametrize("kind", list(FRAMES))
def test_neighbors_match_ase(kind):
    for frame in FRAMES[kind]:
        nl = neighbor_list(frame.positions, frame.cell, frame.pbc, CUTOFF)
        ours = np.column_stack([nl.i, nl.j, nl.shifts])
        ref, ref_d = _ase_edges(frame, CUTOFF)
        assert ours.shape == ref.shape, (frame.source, ours.shape, ref.shape)
        np.testing.assert_array_equal(ours, ref)  # ours is sorted by (i, j, shift) like ref
        np.testing.assert_allclose(nl.distances, ref_d, rtol=0, atol=1e-9)


def test_one_atom_cell_spans_many_images():
    al = FRAMES["al_one_atom"][0]
    nl = neighbor_list(al.positions, al.cell, al.pbc, CUTOFF)
    assert (nl.i == 0).all() and (nl.j == 0).all()
    assert np.abs(nl.shifts).max() >= 2  # neighbors beyond the first image shell
    assert not (nl.shifts == 0).all(axis=1).any()  # no self edge


def _brute_angles(frame: Frame) -> set[tuple]:
    """Every ordered pair of distinct bonds (j1,S1) ≠ (j2,S2) < three-body cutoff around each centre, from ASE's list."""
    rows, d = _ase_edges(frame, THREE_BODY)
    by_centre: dict[int, list[tuple]] = {}
    for row in rows:
        by_centre.setdefault(int(row[0]), []).append(tuple(int(x) for x in row[1:]))
    return {(c, *b1, *b2) for c, bonds in by_centre.items() for b1, b2 in permutations(bonds, 2)}


@pytest.mark.parametrize("kind", ["mlearn_slab", "al_one_atom", "oxides", "spice", "water"])
def test_angles_match_brute_force(kind):
    for frame in FRAMES[kind][:2]:
        g = build_graph(frame, CUTOFF, THREE_BODY)
        i, j = g.edge_index
        e1, e2 = g.angle_index
        assert (i[e1] == i[e2]).all()
        ours = {
            (int(i[a]), int(j[a]), *map(int, g.edge_shift[a]), int(j[b]), *map(int, g.edge_shift[b]))
            for a, b in zip(e1, e2)
        }
        assert len(ours) == g.angle_index.shape[1]  # no duplicate pair
        assert ours == _brute_angles(frame), frame.source


@pytest.mark.parametrize("kind", ["mlearn_slab", "al_one_atom", "feo", "water", "spice"])
def test_edge_reverse(kind):
    for frame in FRAMES[kind]:
        g = build_graph(frame, CUTOFF, THREE_BODY)
        i, j = g.edge_index
        r = g.edge_reverse
        np.testing.assert_array_equal(i[r], j)
        np.testing.assert_array_equal(j[r], i)
        np.testing.assert_array_equal(g.edge_shift[r], -g.edge_shift)
        np.testing.assert_array_equal(r[r], np.arange(r.size))


def test_mixed_batch_matches_each_structure():
    frames = [FRAMES[k][0] for k in FRAMES]
    batch = collate(frames, cutoff=CUTOFF, three_body_cutoff=THREE_BODY, dtype=torch.float64)
    vec = edge_vectors(batch.positions, batch.cell, batch)
    graph_of_edge = batch.batch[batch.edge_index[0]]
    offset = 0
    for g, frame in enumerate(frames):
        sel = graph_of_edge == g
        local = np.column_stack([(batch.edge_index[:, sel] - offset).T.numpy(), batch.edge_shift[sel].numpy()])
        ref, ref_d = _ase_edges(frame, CUTOFF)
        np.testing.assert_array_equal(local, ref, err_msg=frame.source)
        np.testing.assert_allclose(vec[sel].norm(dim=1).numpy(), ref_d, atol=1e-9)
        offset += frame.natoms
    e1, e2 = batch.angle_index
    assert (batch.edge_index[0, e1] == batch.edge_index[0, e2]).all()
    assert batch.num_angles == sum(build_graph(f, CUTOFF, THREE_BODY).angle_index.shape[1] for f in frames)
    r = batch.edge_reverse
    assert (batch.edge_index[:, r] == batch.edge_index.flip(0)).all()


@pytest.mark.parametrize("with_graph", [True, False], ids=["graph", "atoms-only"])
def test_packed_batch_unpacks_to_the_same_tensors_as_views(with_graph):
    """One buffer crosses the worker boundary; every field comes back with its dtype, shape and values, including
    the empty edge and angle lists of an atoms-only batch, as views of that buffer."""
    from dataclasses import fields

    frames = [FRAMES[k][0] for k in FRAMES]
    batch = collate(frames, cutoff=CUTOFF, three_body_cutoff=THREE_BODY, with_graph=with_graph)
    packed = pack(batch)
    unpacked = packed.unpack()
    start, end = packed.buffer.data_ptr(), packed.buffer.data_ptr() + packed.buffer.numel()
    for f in fields(batch):
        a, b = getattr(batch, f.name), getattr(unpacked, f.name)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f.name
        assert b.numel() == 0 or start <= b.data_ptr() < end, f.name


def test_collate_without_graph_leaves_edges_empty():
    batch = collate(FRAMES["oxides"][:3], with_graph=False)
    assert batch.num_edges == 0 and batch.num_angles == 0 and batch.edge_reverse.numel() == 0
    assert batch.positions.shape[0] == sum(f.natoms for f in FRAMES["oxides"][:3])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_device_graph_equals_cpu_graph(dtype):
    pytest.importorskip("vesin_torch")
    from lampretrain.graph.device import attach_graph

    frames = [FRAMES[k][0] for k in FRAMES] + FRAMES["oxides"][1:4]
    cpu = collate(frames, cutoff=CUTOFF, three_body_cutoff=THREE_BODY, dtype=dtype)
    bare = collate(frames, dtype=dtype, with_graph=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    built = attach_graph(bare.to(device), CUTOFF, THREE_BODY).to("cpu")
    for name in ("edge_index", "edge_shift", "edge_reverse", "angle_index"):
        assert torch.equal(getattr(built, name), getattr(cpu, name)), name
    assert built.edge_shift.dtype == dtype


def test_device_graph_molecule_only_and_empty_angles():
    pytest.importorskip("vesin_torch")
    from lampretrain.graph.device import attach_graph

    frames = FRAMES["cho_molecules"]
    cpu = collate(frames, cutoff=3.0, three_body_cutoff=0.5, dtype=torch.float64)
    built = attach_graph(collate(frames, dtype=torch.float64, with_graph=False), 3.0, 0.5)
    assert cpu.num_angles == 0 and built.num_angles == 0
    assert torch.equal(built.edge_index, cpu.edge_index)
