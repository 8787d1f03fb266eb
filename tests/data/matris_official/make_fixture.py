"""Write the official-MatRIS fixture with the official code (PyPI ``matris`` 1.0.0) itself.

    python -m venv ~/.cache/lampretrain/matris1-venv
    ~/.cache/lampretrain/matris1-venv/bin/pip install torch==2.13.0 'numpy>=2' 'ase>=3.23' 'pymatgen>=2024.9.10' \
        ninja 'nvalchemi-toolkit-ops>=0.4.1,<0.5'
    ~/.cache/lampretrain/matris1-venv/bin/pip install --no-deps --ignore-requires-python matris==1.0.0
    ~/.cache/lampretrain/matris1-venv/bin/python tests/data/matris_official/make_fixture.py

(matris 1.0.0 declares Python >= 3.12 but runs on 3.11; its fast mode is CUDA-only, so mode="torch".)

Writes, next to this script:
- ``matris_1.0.0_small.pth.tar``: ``{"config": model.config, "state_dict": model.state_dict()}``, the layout
  ``MatRIS.from_dict`` reads, of a reduced-width MatRIS (2 blocks, 32 channels, the released choices: fourier
  three-body basis, layer norm, GateMLP, smoothed edge deltas), its weights drawn away from their initial values
  (so residual scales are not zero) and its element references fitted by the official ``AtomRef.fit`` on the
  bundled Cu and oxide cells;
- ``predictions.json``: energy, forces, stress (eV/Å³, ASE sign) and magmoms of ``MatRISCalculator(model=PATH,
  task="efsm", mode="torch")`` on bundled periodic cells (mlearn Cu, oxides, water), in float32, and of the same
  calculator with the model in float64.
The nested layout ``{"model": {...}}`` with the trainer's legacy reference key is checked to load to the same
predictions (the variants ``MatRIS.from_dict`` of 1.0.0 accepts).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from matris.applications.base import MatRISCalculator
from matris.model import MatRIS
from pymatgen.io.ase import AseAtomsAdaptor

HERE = Path(__file__).parent
REAL = HERE.parent / "real"


def cu_cells(n: int) -> list[Atoms]:
    data = json.loads((REAL / "mlearn_pbe_elemental" / "Cu" / "test.json").read_text())
    out = []
    for entry in data[:n]:
        s = entry["structure"]
        lattice = np.array(s["lattice"]["matrix"])
        frac = np.array([site["abc"] for site in s["sites"]])
        atoms = Atoms(numbers=[29] * len(frac), scaled_positions=frac, cell=lattice, pbc=True)
        atoms.info["energy"] = entry["outputs"]["energy"]
        out.append(atoms)
    return out


def oxide_cells(n: int) -> list[Atoms]:
    from ase.db import connect

    with connect(str(REAL / "fairchem_oxides_asedb" / "oxides.db")) as db:
        rows = list(db.select(limit=n))
    out = []
    for row in rows:
        atoms = row.toatoms()
        atoms.info["energy"] = row.energy
        out.append(atoms)
    return out


def water_cell() -> Atoms:
    d = REAL / "deepmd_water" / "data_0"
    types = np.loadtxt(d / "type.raw", dtype=int)
    names = (d / "type_map.raw").read_text().split()
    numbers = [{"O": 8, "H": 1}[names[t]] for t in types]
    coord = np.load(d / "set.000" / "coord.npy")[0].reshape(-1, 3)
    box = np.load(d / "set.000" / "box.npy")[0].reshape(3, 3)
    return Atoms(numbers=numbers, positions=coord, cell=box, pbc=True)


def predict(calc: MatRISCalculator, atoms: Atoms) -> dict:
    atoms = atoms.copy()
    atoms.calc = calc
    return {
        "energy": float(atoms.get_potential_energy()),
        "forces": atoms.get_forces().tolist(),
        "stress": atoms.get_stress(voigt=False).tolist(),
        "magmoms": calc.results["magmoms"].tolist(),
    }


def predict64(model: MatRIS, atoms: Atoms) -> dict:
    """What the calculator computes, with the graph's coordinates in float64 (its calculator builds float32 ones)."""
    from ase import units

    graph = model.graph_converter(
        AseAtomsAdaptor.get_structure(atoms), atomic_numbers=atoms.get_atomic_numbers(),
        frac_coords=atoms.get_scaled_positions(wrap=False), lattice_matrix=atoms.cell.array,
        cart_coords=atoms.get_positions(), mode="torch",
    )
    for name, value in vars(graph).items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            setattr(graph, name, value.double())
    graph.lattice = torch.as_tensor(atoms.cell.array, dtype=torch.float64)
    graph.atom_frac_coord = torch.as_tensor(atoms.get_scaled_positions(wrap=False), dtype=torch.float64)
    p = model([graph], task="efsm", is_training=False, mode="torch")
    n = len(atoms) if model.is_intensive else 1
    return {
        "energy": p["e"][0].item() * n,
        "forces": p["f"][0].detach().numpy().tolist(),
        "stress": (p["s"][0].detach().numpy() * units.GPa).tolist(),
        "magmoms": p["m"][0].detach().numpy().tolist(),
    }


def main() -> None:
    torch.manual_seed(0)
    model = MatRIS(
        num_layers=2, node_feat_dim=32, edge_feat_dim=32, three_body_feat_dim=32, mlp_hidden_dims=[32, 64],
        three_body_expansion="fourier", norm_type="layer", pairwise_cutoff=5.0, three_body_cutoff=3.5,
        use_smoothed_for_delta_edge=True, is_intensive=True, reference_energy="mptrj",
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("reference_energy"):
                p.add_(0.1 * torch.randn_like(p))
    fit = cu_cells(4) + oxide_cells(6)
    # an intensive model fits energies per atom
    model.reference_energy.fit([AseAtomsAdaptor.get_structure(a) for a in fit], [a.info["energy"] / len(a) for a in fit])
    path = HERE / "matris_1.0.0_small.pth.tar"
    torch.save({"config": model.config, "state_dict": model.state_dict()}, path)

    cells = {"cu": cu_cells(2), "oxides": oxide_cells(2), "water": [water_cell()]}
    out: dict = {"file": path.name, "matris": "1.0.0", "float32": {}, "float64": {}, "structures": {
        key: [{"numbers": a.numbers.tolist(), "positions": a.positions.tolist(), "cell": a.cell.array.tolist()}
              for a in atoms_list] for key, atoms_list in cells.items()}}
    calc = MatRISCalculator(model=str(path), task="efsm", mode="torch")
    for key, atoms_list in cells.items():
        out["float32"][key] = [predict(calc, a) for a in atoms_list]
    model64 = calc.model.double()
    for key, atoms_list in cells.items():
        out["float64"][key] = [predict64(model64, a) for a in atoms_list]

    # the nested layout and the trainer's legacy reference key load to the same model
    state = dict(model.state_dict())
    state["composition_model.fc.weight"] = state.pop("reference_energy.fc.weight")
    nested = MatRIS.from_dict({"model": {"config": model.config, "state_dict": state}})
    for a, b in zip(nested.state_dict().values(), MatRIS.from_dict(torch.load(path, weights_only=True)).state_dict().values()):
        assert torch.equal(a, b)
    (HERE / "predictions.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes) and predictions.json")


if __name__ == "__main__":
    main()
