"""Write the deepmd-kit DPA4 fixtures of tests/test_import_deepmd.py with deepmd-kit's own code.

Run with the deepmd-kit 3.2.0 interpreter (see lampretrain/bench/peer_deepmd.py for the venv), from the repository root:

    ~/.cache/lampretrain/deepmd-venv/bin/python tests/data/deepmd_dpa4/make_fixture.py

It never imports lampretrain. What it writes next to itself:

- ``model.ckpt.pt``: a single-task trainer checkpoint (``Trainer.save_model``: ``{"model": wrapper state dict with
  _extra_state {model_params, train_infos}, "optimizer": ...}``) of a DPA4-Air-shaped model at reduced width
  (C=8, L=3, M=1, 3 blocks, 4 SO(2) layers, 1 focus, rank 1, 8 radial functions, 5 Å), type map H C O Cu;
- ``multitask.ckpt.pt``: a two-branch (``cu``, ``cho``) multi-task trainer checkpoint, shared descriptor, one GLU
  fitting net per branch;
- ``predictions.json``: deepmd-kit's energy (eV), forces (eV/Å) and virial (eV) of each structure, for every
  checkpoint and branch, in float32 and float64 (the float64 model carries the same, float32-representable
  weights), and the structures themselves (positions, numbers, cell).

Weights: deepmd-kit's initialisation, then every weight matrix it initialises to zero (the residual branches' last
layers, the env-seed FiLM projection, the FFN outputs) and every bias/scale filled with random values, so each part of
the network contributes; type rows of the padding slot stay zero, as deepmd keeps them. The energy biases
(``out_bias``, ``bias_atom_e``) are deepmd's own statistics of the training systems (the Cu cells and the molecule,
converted to deepmd npy in a temporary directory) plus a random shift of ``bias_atom_e``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REAL = HERE.parent / "real"
TYPE_MAP = ["H", "C", "O", "Cu"]
Z = {"H": 1, "C": 6, "O": 8, "Cu": 29}
CU_CELLS = (4, 5, 0)  # 20, 30 and 107 atoms of mlearn's Cu test set
SEED = 20261203

DESCRIPTOR = {  # deepmd-kit 3.2.0 DescrptSeZM arguments: the paper's Air shape at reduced width
    "type": "dpa4",
    "sel": 120,
    "rcut": 5.0,
    "env_exp": [7, 5],
    "channels": 8,
    "n_radial": 8,
    "lmax": 3,
    "mmax": 1,
    "n_blocks": 3,
    "mixing_layers": 4,
    "n_focus": 1,
    "focus_dim": 0,
    "radial_so2_mode": "degree_channel",
    "radial_so2_rank": 1,
    "n_atten_head": 1,
    "ffn_neurons": 0,
    "ffn_so3_grid": False,
    "lebedev_quadrature": True,
    "edge_norm": True,
    "use_env_seed": True,
    "random_gamma": True,
    "use_amp": False,
    "precision": "float32",
    "seed": 1,
}
FITTING = {"type": "dpa4_ener", "neuron": [0], "precision": "float32", "seed": 2}


def cu_structures() -> list[dict]:
    records = json.loads((REAL / "mlearn_pbe_elemental" / "Cu" / "test.json").read_text())
    out = []
    for k in CU_CELLS:
        s = records[k]["structure"]
        lattice = np.array(s["lattice"]["matrix"], dtype=float)
        positions = np.array([site["xyz"] for site in s["sites"]], dtype=float)
        out.append({
            "name": f"cu_{k}", "positions": positions.tolist(), "numbers": [29] * len(positions),
            "cell": lattice.tolist(), "energy": float(records[k]["outputs"]["energy"]),
            "forces": np.asarray(records[k]["outputs"]["forces"], dtype=float).tolist(),
        })
    return out


def molecule() -> dict:
    root = REAL / "deepmd_nopbc_cho" / "C3H3O4"
    types = np.loadtxt(root / "type.raw", dtype=int).reshape(-1)
    names = (root / "type_map.raw").read_text().split()
    coords = np.load(root / "set.000" / "coord.npy")[0].reshape(-1, 3).astype(float)
    return {
        "name": "C3H3O4_0", "positions": coords.tolist(), "numbers": [Z[names[t]] for t in types], "cell": None,
        "energy": float(np.load(root / "set.000" / "energy.npy")[0]),
        "forces": np.load(root / "set.000" / "force.npy")[0].reshape(-1, 3).astype(float).tolist(),
    }


def write_system(root: Path, structures: list[dict]) -> None:
    """One deepmd npy system per structure (same atoms per system), energies and forces as labels."""
    for s in structures:
        sys_dir = root / s["name"]
        (sys_dir / "set.000").mkdir(parents=True)
        index = {Z[t]: i for i, t in enumerate(TYPE_MAP)}
        (sys_dir / "type_map.raw").write_text("\n".join(TYPE_MAP) + "\n")
        (sys_dir / "type.raw").write_text("\n".join(str(index[z]) for z in s["numbers"]) + "\n")
        np.save(sys_dir / "set.000" / "coord.npy", np.array(s["positions"]).reshape(1, -1))
        np.save(sys_dir / "set.000" / "energy.npy", np.array([s["energy"]]))
        np.save(sys_dir / "set.000" / "force.npy", np.array(s["forces"]).reshape(1, -1))
        if s["cell"] is None:
            (sys_dir / "nopbc").write_text("")
        else:
            np.save(sys_dir / "set.000" / "box.npy", np.array(s["cell"]).reshape(1, 9))


def training(systems: list[str]) -> dict:
    return {"training_data": {"systems": systems, "batch_size": 1}}


def single_config(root: Path, names: list[str]) -> dict:
    return {
        "model": {"type": "dpa4", "type_map": TYPE_MAP, "descriptor": dict(DESCRIPTOR), "fitting_net": dict(FITTING)},
        "learning_rate": {"type": "exp", "start_lr": 1e-3, "stop_lr": 1e-5, "decay_steps": 100},
        "loss": {"type": "ener", "start_pref_e": 1, "limit_pref_e": 1, "start_pref_f": 1, "limit_pref_f": 1},
        "training": {**training([str(root / n) for n in names]), "numb_steps": 1, "disp_freq": 1, "save_freq": 1,
                     "seed": SEED},
    }


def multi_config(root: Path, branches: dict[str, list[str]]) -> dict:
    loss = {"type": "ener", "start_pref_e": 1, "limit_pref_e": 1, "start_pref_f": 1, "limit_pref_f": 1}
    return {
        "model": {
            "shared_dict": {"type_map_all": TYPE_MAP, "dpa4_descriptor": dict(DESCRIPTOR)},
            "model_dict": {
                b: {"type": "dpa4", "type_map": "type_map_all", "descriptor": "dpa4_descriptor",
                    "fitting_net": {**FITTING, "seed": 2 + k}}
                for k, b in enumerate(branches)
            },
        },
        "learning_rate": {"type": "exp", "start_lr": 1e-3, "stop_lr": 1e-5, "decay_steps": 100},
        "loss_dict": {b: dict(loss) for b in branches},
        "training": {
            "model_prob": {b: 1.0 for b in branches},
            "data_dict": {b: training([str(root / n) for n in names]) for b, names in branches.items()},
            "numb_steps": 1, "disp_freq": 1, "save_freq": 1, "seed": SEED,
        },
    }


def make_trainer(config: dict):
    from deepmd.pt.entrypoints.main import get_trainer
    from deepmd.pt.utils.multi_task import preprocess_shared_params
    from deepmd.utils.argcheck import normalize
    from deepmd.utils.compat import update_deepmd_input

    config = copy.deepcopy(config)
    multi_task = "model_dict" in config["model"]
    shared_links = None
    if multi_task:
        config["model"], shared_links = preprocess_shared_params(config["model"])
    config = normalize(update_deepmd_input(config, warning=False), multi_task=multi_task)
    return get_trainer(config, shared_links=shared_links)


@torch.no_grad()
def fill_weights(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Randomise what deepmd initialises to zero or one, keeping padding type rows at zero; values float32-exact."""
    for name, p in model.named_parameters():
        if not p.dtype.is_floating_point:
            continue
        if "type_embedding" in name:  # (ntypes + 1, dim): the last row is deepmd's padding slot
            p[:-1].add_(0.1 * torch.randn(p[:-1].shape, generator=generator, dtype=torch.float64).to(p.dtype))
            p[-1].zero_()
        elif p.ndim >= 2 and not p.any():
            p.copy_(0.05 * torch.randn(p.shape, generator=generator, dtype=torch.float64) * p.shape[0] ** -0.5)
        else:  # norm scales and biases, strengths, frequencies, attention scalars: a perturbation
            p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype))
        p.copy_(p.float().to(p.dtype))  # float32-representable: the float64 twin is the same function
    for name, b in model.named_buffers():
        if name.endswith("bias_atom_e"):  # deepmd's own bias is zero after its statistics: shift it, so it counts
            b.add_(torch.randn(b.shape, generator=generator, dtype=torch.float64).to(b.dtype))


def predict(model, structures: list[dict], dtype: torch.dtype) -> list[dict]:
    from deepmd.pt.utils import env

    model.eval()
    out = []
    index = {Z[t]: i for i, t in enumerate(TYPE_MAP)}
    for s in structures:
        coord = torch.tensor(s["positions"], dtype=env.GLOBAL_PT_FLOAT_PRECISION)[None]
        atype = torch.tensor([index[z] for z in s["numbers"]])[None]
        box = None if s["cell"] is None else torch.tensor(s["cell"], dtype=env.GLOBAL_PT_FLOAT_PRECISION).reshape(1, 9)
        r = model(coord, atype, box=box)
        out.append({
            "energy": float(r["energy"].reshape(-1)[0]),
            "forces": r["force"].reshape(-1, 3).double().tolist(),
            "virial": r["virial"].reshape(3, 3).double().tolist(),
        })
    return out


def twin64(model_params: dict, state: dict):
    """deepmd's model of ``model_params`` at precision float64, loaded with ``state`` (one branch)."""
    from deepmd.pt.model.model import get_model

    params = copy.deepcopy(model_params)
    params["descriptor"]["precision"] = "float64"
    params["fitting_net"]["precision"] = "float64"
    model = get_model(params)
    target = model.state_dict()
    learned = dict(model.named_parameters())
    # parameters and the float64 statistics from the checkpoint; float32 constant buffers (norm balance weights, ...)
    # stay as the float64 model built them, or they would carry float32 rounding into the float64 reference
    keep = {k for k in target if k in learned or not state[k].dtype.is_floating_point or state[k].dtype == torch.float64}
    model.load_state_dict({k: (state[k] if k in keep else target[k]).to(target[k].dtype) for k in target})
    return model


def branch_state(wrapper_state: dict, branch: str) -> dict:
    prefix = f"model.{branch}."
    return {k[len(prefix):]: v for k, v in wrapper_state.items() if k.startswith(prefix)}


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    cu, mol = cu_structures(), molecule()
    structures = [*cu, mol]
    result: dict = {"type_map": TYPE_MAP, "descriptor": DESCRIPTOR, "fitting_net": FITTING,
                    "deepmd_kit": __import__("deepmd").__version__, "torch": torch.__version__,
                    "structures": [{k: s[k] for k in ("name", "positions", "numbers", "cell")} for s in structures],
                    "checkpoints": {}}
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_system(root, structures)
        os.chdir(root)  # the trainer writes its logs and stat files here
        try:
            jobs = {
                "model.ckpt.pt": single_config(root, [s["name"] for s in structures]),
                "multitask.ckpt.pt": multi_config(root, {"cu": [s["name"] for s in cu], "cho": [mol["name"]]}),
            }
            for fname, config in jobs.items():
                trainer = make_trainer(config)
                fill_weights(trainer.wrapper, generator)
                trainer.save_model(HERE / fname, lr=1e-3, step=0)
                saved = torch.load(HERE / fname, weights_only=True)["model"]
                params = saved["_extra_state"]["model_params"]
                branches = params["model_dict"] if "model_dict" in params else {"Default": params}
                entry = {}
                for branch, model_params in branches.items():
                    model32 = trainer.wrapper.model[branch]
                    state = branch_state(saved, branch)
                    entry[branch] = {
                        "float32": predict(model32, structures, torch.float32),
                        "float64": predict(twin64(model_params, state), structures, torch.float64),
                    }
                result["checkpoints"][fname] = entry
        finally:
            os.chdir(cwd)
    (HERE / "predictions.json").write_text(json.dumps(result, indent=1) + "\n")
    for f in sorted(HERE.iterdir()):
        print(f.name, f.stat().st_size)


if __name__ == "__main__":
    sys.exit(main())
