"""Exported energy/forces/stress programs: one export serves any structure size, matches eager, runs without lampretrain."""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lampretrain.inference.cli import add_parser, run
from lampretrain.inference.export import (
    INPUTS,
    HeadFunction,
    example_inputs,
    export_metadata,
    export_model,
    save_exported,
    tracing_example,
)
from lampretrain.io import read_frames
from lampretrain.models.multitask import DatasetSpec, HeadsConfig, MultiTaskConfig, MultiTaskModel

REAL = Path(__file__).parent / "data" / "real"
TINY = {
    "matris-10m": dict(num_layers=1, atom_dim=8, bond_dim=8, angle_dim=8, readout_hidden=(8,), magmom_hidden=8, num_radial=4),
    "dpa4-neo": dict(channels=8, lmax=1, n_blocks=1, so2_layers=1, n_radial=4),
}
REFS = {1: -3.4, 6: -8.1, 8: -4.9, 14: -5.4, 22: -7.8, 50: -3.9}


def tiny_model(backbone: str) -> MultiTaskModel:
    torch.manual_seed(0)
    config = MultiTaskConfig(
        backbone=backbone,
        datasets=[DatasetSpec("mptrj", REFS), DatasetSpec("spice", {k: 0.5 * v for k, v in REFS.items()})],
        heads=HeadsConfig(hidden=(8,)),
        backbone_options=TINY[backbone],
    )
    model = MultiTaskModel(config).double().eval()
    with torch.no_grad():  # weights away from the initialisation so that forces and stress are not tiny
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def structures() -> list:
    """Real structures of different sizes: oxide crystals (3, 12 atoms), a CHO molecule (7), a Si cell (24)."""
    oxides = list(itertools.islice(read_frames(REAL / "fairchem_oxides_asedb" / "oxides.db"), 40))
    picked = [next(f for f in oxides if f.natoms == n) for n in (3, 12)]
    picked.append(next(iter(read_frames(REAL / "deepmd_nopbc_cho" / "C1H4O2"))))
    picked.append(next(f for f in read_frames(REAL / "mlearn_pbe_elemental" / "Si") if f.natoms == 24))
    return picked


PLAIN_SCRIPT = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "lampretrain":
            raise ImportError("lampretrain must not be needed to run an exported model")
sys.meta_path.insert(0, Block())
import numpy as np, torch
extra = {"lampretrain.json": ""}
function = torch.export.load(sys.argv[1], extra_files=extra).module()
open("meta.json", "w").write(extra["lampretrain.json"])
for path in sys.argv[2:]:
    arrays = np.load(path, allow_pickle=False)
    outputs = function(*[torch.from_numpy(arrays[name]) for name in arrays.files])
    np.savez(path.replace("inputs", "outputs"), **dict(zip(("energy", "forces", "stress"), (t.detach().numpy() for t in outputs))))
assert not any(m.split(".")[0] == "lampretrain" for m in sys.modules)
"""


@pytest.fixture(scope="module", params=[("matris-10m", "mptrj", "api"), ("dpa4-neo", "spice", "cli")], ids=lambda p: p[0])
def exported(request, tmp_path_factory):
    """Export once (traced on two copies of a 6-atom oxide), then run the file from a plain Python process on
    single structures of 3, 12, 7 (molecule) and 24 atoms and on a mixed batch of three."""
    backbone, dataset, via = request.param
    tmp = tmp_path_factory.mktemp(backbone)
    model = tiny_model(backbone)
    if via == "api":
        oxide6 = next(f for f in read_frames(REAL / "fairchem_oxides_asedb" / "oxides.db") if f.natoms == 6)
        program = export_model(model, dataset, tracing_example(oxide6, model, torch.float64))
        save_exported(program, tmp / "model.pt2", export_metadata(model, dataset, torch.float64))
    else:
        model.save(tmp / "model.pt")
        parser = argparse.ArgumentParser()
        add_parser(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["export", str(tmp / "model.pt"), str(tmp / "model.pt2"), "--dataset", dataset,
                                  "--dtype", "float64", "--structure", str(REAL / "fairchem_oxides_asedb" / "oxides.db")])
        assert run(args) == 0
    frames = structures()
    batches = [[f] for f in frames] + [[frames[2], frames[0], frames[3]]]
    cases = []
    for k, batch in enumerate(batches):
        inputs = example_inputs(batch, model, torch.float64)
        np.savez(tmp / f"inputs{k}.npz", **{name: t.numpy() for name, t in zip(INPUTS, inputs)})
        cases.append((batch, eager(model, dataset, inputs), tmp / f"outputs{k}.npz"))
    (tmp / "run.py").write_text(PLAIN_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(tmp / "run.py"), str(tmp / "model.pt2"), *(str(tmp / f"inputs{k}.npz") for k in range(len(batches)))],
        capture_output=True, text=True, cwd=tmp, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dataset, json.loads((tmp / "meta.json").read_text()), cases


def eager(model: MultiTaskModel, dataset: str, inputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    outputs = HeadFunction(model, dataset)(*inputs)
    return {name: t.detach().numpy() for name, t in zip(("energy", "forces", "stress"), outputs)}


def test_one_export_matches_eager_on_structures_of_every_size(exported):
    _, _, cases = exported
    for batch, want, outputs in cases:
        got = np.load(outputs, allow_pickle=False)
        for name in ("energy", "forces", "stress"):
            assert got[name].shape == want[name].shape, name
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6,
                                       err_msg=f"{name}, {[f.natoms for f in batch]} atoms")
    assert np.abs(got["forces"]).max() > 1e-3 and np.abs(got["stress"]).max() > 1e-4  # mixed batch: real F and σ
    molecule = np.load(cases[2][2], allow_pickle=False)
    assert molecule["forces"].shape == (7, 3) and np.all(molecule["stress"] == 0.0)  # no stress without a cell


def test_exported_file_names_its_head_and_cutoffs(exported):
    dataset, meta, _ = exported
    assert meta["dataset"] == dataset and meta["inputs"] == list(INPUTS) and meta["dtype"] == "float64"
    assert meta["cutoff"] == 6.0 and meta["three_body_cutoff"] == (4.5 if dataset == "mptrj" else 0.0)


def test_export_rejects_a_single_graph_example():
    model = tiny_model("matris-10m")
    frame = next(iter(read_frames(REAL / "deepmd_nopbc_cho" / "C1H4O2")))
    with pytest.raises(ValueError, match="≥ 2 graphs"):
        export_model(model, "mptrj", example_inputs(frame, model, torch.float64))
