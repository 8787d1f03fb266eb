"""Shared by the training, validation, fine-tuning, property-head and sweep tests: real fixture paths, small stores,
a tiny MatRIS recipe."""

from __future__ import annotations

from pathlib import Path

import yaml

from lampretrain.config import from_dict
from lampretrain.prep.pipeline import prepare
from lampretrain.prep.spec import PrepSpec
from lampretrain.train.distributed import free_port  # noqa: F401 (tests take it from here)

REPO = Path(__file__).resolve().parent.parent
REAL = REPO / "tests" / "data" / "real"
FEO = REAL / "custodian_vasp_mp/FeO_PBEU_relax/vasprun.xml"
AL = REAL / "custodian_vasp_mp/Al_r2SCAN_relax/vasprun.xml"
OXIDES = REAL / "fairchem_oxides_asedb/oxides.db"
# Short cutoffs keep the tests fast on a shared CPU: a 4-atom FeO cell has ~50x fewer bond pairs at 3 Å than at 4.5 Å.
SMALL_GRAPHS = {"cutoff": 4.0, "three_body_cutoff": 3.0}


def make_store(out: Path, sources: list[dict], val: float = 0.2, graphs: dict | None = None) -> Path:
    """``sources`` prepared into a store at ``out`` (``graphs``: prep cutoffs, default :data:`SMALL_GRAPHS`)."""
    graphs = SMALL_GRAPHS if graphs is None else graphs
    spec = from_dict(PrepSpec, {"name": out.name, "output": str(out), "sources": sources, "split": {"val": val},
                                "shard_size_mb": 1, **graphs})
    prepare(spec, workers=1, progress=False)
    return out


def oxides_slice(root: Path, n: int) -> Path:
    """The first ``n`` structures of the real oxides ASE db as extxyz: a slice keeps a module's runtime small."""
    from ase.io import write

    from lampretrain.io import read_frames

    path = root / f"oxides_first{n}.extxyz"
    write(path, [f.to_atoms() for _, f in zip(range(n), read_frames(OXIDES))], format="extxyz")
    return path


def tiny_recipe(store: Path, output: Path, steps: int) -> dict:
    recipe = yaml.safe_load((REPO / "recipes" / "demo-matris.yaml").read_text())
    recipe["data"].update(store=str(store), datasets=None, budget=64, max_natoms=32,
                          sampling={"strategy": "temperature", "temperature": 2.0})
    recipe["model"]["options"] = {"num_layers": 2, "atom_dim": 16, "bond_dim": 16, "angle_dim": 16,
                                  "readout_hidden": [16], "magmom_hidden": 16, **SMALL_GRAPHS}
    recipe["model"]["heads"] = {"hidden": [16]}
    # pinned here, not inherited: the demo's loss weights are tuned for its own datasets and length
    recipe["objective"] = {"energy": 2.0, "forces": 10.0, "stress": 0.1, "options": {"balancing": "static"}}
    recipe["output"] = str(output)
    recipe["train"].update(steps=steps, progress=False, log_every=2, ema_decay=None, refit_references=None)
    recipe["schedule"] = {"kind": "constant"}
    recipe["checkpoint"] = {"every": steps, "keep": 1}
    return recipe


def tiny_run(root: Path, sources: list[dict], steps: int = 1) -> dict:
    """A tiny MatRIS pretrained in-process on ``sources`` under ``root``: store, recipe (also as recipe.yaml, tracking
    off), run directory and its final checkpoint."""
    from lampretrain.recipe import parse_recipe
    from lampretrain.train import pretrain

    store = make_store(root / "store", sources)
    recipe = tiny_recipe(store, root / "run", steps)
    recipe["tracking"] = {"enabled": False}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    checkpoint = pretrain(parse_recipe(recipe)).checkpoint
    return {"root": root, "store": store, "recipe": recipe, "run": root / "run", "checkpoint": checkpoint}


def training_store(root: Path) -> Path:
    """The trainer tests' store: two VASP relaxations and two molecular HDF5 sets, 10 % val, prep's own cutoffs."""
    return make_store(root, [
        {"path": str(REAL / "custodian_vasp_mp/FeO_PBEU_relax/vasprun.xml"), "dataset": "mp_pbeu"},
        {"path": str(REAL / "custodian_vasp_mp/Al_r2SCAN_relax/vasprun.xml"), "dataset": "mp_r2scan"},
        {"path": str(REAL / "spice_hdf5/SPICE-1.1.4_n2.hdf5"), "dataset": "spice"},
        {"path": str(REAL / "ani1x_hdf5/ani1_n5.hdf5"), "dataset": "ani1x"},
    ], val=0.1, graphs={})
