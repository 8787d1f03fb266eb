"""The Backbone contract: a backbone defined here trains through the real trainer, the registry refuses one that
breaks the contract, and checkpoints written before the backbones lost their single-task heads still load.

tests/data/legacy/ was written by the code at commit 99488e2 (backbones with their own frozen energy heads and
references): ``matris.pt`` / ``dpa4.pt`` are tiny two-dataset ``MultiTaskModel.save`` files, ``matris-dcp`` a
one-step trainer checkpoint (model + EMA; re-written without optimizer state to stay small), and
``expected.json`` what each gave on the FeO cell in float64 with one thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from lampretrain import models
from lampretrain.config import override
from lampretrain.finetune.model import freeze, lr_scales
from lampretrain.graph.batch import GraphBatch, collate, edge_vectors
from lampretrain.inference.loading import load_model
from lampretrain.io import read_frames
from lampretrain.models.backbone import NodeFeatures
from lampretrain.models.layers.scatter import scatter_sum
from lampretrain.models.multitask import DatasetSpec, MultiTaskConfig, MultiTaskModel
from lampretrain.recipe import parse_recipe
from lampretrain.train import checkpoint as ckpt
from lampretrain.train import pretrain
from lampretrain.train.trainer import TrainHooks

from finetune_support import AL, FEO, REPO, make_store, tiny_recipe

LEGACY = REPO / "tests" / "data" / "legacy"


@dataclass(frozen=True)
class PairConfig:
    channels: int = 8
    n_blocks: int = 2
    cutoff: float = 3.5


class PairBlock(torch.nn.Module):
    """h_i ← h_i + Σ_j W(φ(r_ij)) ⊙ h_j · u(r_ij): one continuous-filter convolution."""

    def __init__(self, channels: int, n_radial: int):
        super().__init__()
        self.filter = torch.nn.Linear(n_radial, channels)

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        i, j = edge_index
        return h + scatter_sum(self.filter(basis) * h[j], i, h.shape[0])


class PairNet(torch.nn.Module):
    """A backbone known only to this file: element embedding, then pair convolutions within ``cutoff``."""

    three_body_cutoff = 0.0
    vector_channels = 0
    default_heads = {"hidden": (8,)}
    retired_keys = ()

    def __init__(self, config: PairConfig):
        super().__init__()
        self.config = config
        self.embedding = torch.nn.Embedding(119, config.channels)
        self.register_buffer("centres", torch.linspace(0.0, config.cutoff, 6))
        self.blocks = torch.nn.ModuleList(PairBlock(config.channels, 6) for _ in range(config.n_blocks))
        self.norm = torch.nn.LayerNorm(config.channels)

    @property
    def cutoff(self) -> float:
        return self.config.cutoff

    @property
    def node_channels(self) -> int:
        return self.config.channels

    def layers(self) -> list[torch.nn.Module]:
        return [self.embedding, *self.blocks]

    def node_features(self, batch: GraphBatch, positions: torch.Tensor, cell: torch.Tensor) -> NodeFeatures:
        r = edge_vectors(positions, cell, batch).norm(dim=-1)  # (E,)
        smooth = torch.cos(0.5 * torch.pi * r / self.cutoff) ** 2  # → 0 at the cutoff
        basis = torch.exp(-4.0 * (r[:, None] - self.centres) ** 2) * smooth[:, None]  # (E, 6)
        h = self.embedding(batch.numbers)
        for block in self.blocks:
            h = block(h, batch.edge_index, basis)
        return NodeFeatures(self.norm(h), None)


def configure_pair(**overrides) -> PairConfig:
    return override(PairConfig(), overrides)


@models.register("pairnet-test", configure_pair)
def pairnet(**overrides) -> PairNet:
    return PairNet(configure_pair(**overrides))


class KeepInitial(TrainHooks):
    """Pretraining, remembering the backbone's weights at step 0."""

    def build_model(self, recipe, data) -> MultiTaskModel:
        model = super().build_model(recipe, data)
        self.initial = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
        return model


def test_a_backbone_defined_outside_the_library_trains_two_steps_through_the_trainer(tmp_path):
    store = make_store(tmp_path / "store", [{"path": str(FEO), "dataset": "mp_pbeu"},
                                            {"path": str(AL), "dataset": "mp_r2scan"}], val=0.0)
    recipe = tiny_recipe(store, tmp_path / "run", 2)
    recipe["model"] = {"name": "pairnet-test", "options": {"channels": 8, "cutoff": 3.0}, "heads": {"hidden": [8]}}
    recipe["engine"] = {"name": "ddp"}
    hooks = KeepInitial()
    result = pretrain(parse_recipe(recipe), hooks=hooks)
    model = load_model(result.checkpoint, weights="model")
    assert isinstance(model.backbone, PairNet) and models.graph_cutoffs(model) == (3.0, 0.0)
    moved = [n for n, p in model.backbone.named_parameters() if not torch.equal(p, hooks.initial[n])]
    assert any(n.startswith("blocks.1.") for n in moved) and any(n.startswith("embedding.") for n in moved)
    assert ckpt.read_meta(result.checkpoint)["step"] == 2
    # fine-tuning's depth order comes from layers(): embedding deepest, the norm with the heads
    frozen = freeze(model, "blocks", 1)
    assert sorted({n.split(".")[1] for n in frozen}) == ["blocks", "embedding"]
    assert all(n.startswith(("backbone.embedding.", "backbone.blocks.0.")) for n in frozen)
    scales = lr_scales(model, 0.5)
    assert scales["backbone.embedding.weight"] == 0.125 and scales["backbone.blocks.1.filter.weight"] == 0.5
    assert scales["backbone.norm.weight"] == 1.0


def test_build_gives_the_backbone_its_default_heads_and_refuses_a_broken_contract():
    model = models.build("pairnet-test", channels=4)
    assert model.dataset_names == ["default"] and model.config.heads.hidden == (8,)
    assert model.energy_heads.mlp.weights[0].shape == (1, 4, 8)
    batch = collate([next(iter(read_frames(FEO)))], cutoff=3.5, three_body_cutoff=0.0)
    assert model(batch)["forces"].shape == (4, 3)

    models.register("broken-test", configure_pair)(lambda **kw: torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="Linear is not a Backbone: missing cutoff, .*node_features, layers"):
        models.build_backbone("broken-test")


def _outputs(model: MultiTaskModel, structure: str) -> dict:
    """What expected.json holds per dataset: float64 energies, |F| sum, σ_xx and magmoms on ``structure``."""
    model = model.to(torch.float64).eval()
    cutoff, three_body = models.graph_cutoffs(model)
    batch = collate([next(iter(read_frames(REPO / structure)))], cutoff=cutoff, three_body_cutoff=three_body,
                    dtype=torch.float64)
    out = {}
    for name in model.dataset_names:
        res = model(batch, dataset=name)
        out[name] = {"energy": res["energy"].tolist(), "forces_sum_abs": float(res["forces"].abs().sum()),
                     "stress_00": float(res["stress"][0, 0, 0]), "magmoms": res["magmoms"].tolist()}
    return out


def assert_same_outputs(got: dict, want: dict) -> None:
    """Equal to float64 rounding: another CPU's kernels sum in another order (seen: 3e-16 relative); a weight
    loaded into the wrong place changes the outputs at the percent level."""
    assert got.keys() == want.keys()
    for name in want:
        for key, value in want[name].items():
            np.testing.assert_allclose(got[name][key], value, rtol=1e-12, atol=1e-14, err_msg=f"{name} {key}")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as expected.json was made: a reduction's order may depend on the thread count
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["matris.pt", "dpa4.pt"])
def test_a_model_file_saved_with_the_single_task_heads_loads_and_reproduces_its_outputs(name, one_thread):
    expected = json.loads((LEGACY / "expected.json").read_text())
    saved = torch.load(LEGACY / name, weights_only=True)["state_dict"]
    model = MultiTaskModel.load(LEGACY / name)
    retired = sorted(set(saved) - set(model.state_dict()))
    assert retired and all(k.startswith(("backbone.energy_head.", "backbone.magmom_head.", "backbone.atom_ref",
                                         "backbone.readout.")) for k in retired)
    assert set(model.state_dict()) == set(saved) - set(retired)  # every other name is kept
    assert_same_outputs(_outputs(model, expected["structure"]), expected[name])


@pytest.mark.parametrize("weights", ["ema", "model"])
def test_a_trainer_checkpoint_saved_with_the_single_task_heads_loads_and_reproduces_its_outputs(weights, one_thread):
    expected = json.loads((LEGACY / "expected.json").read_text())
    saved = ckpt.read_metadata(LEGACY / "matris-dcp").state_dict_metadata
    assert "model.backbone.energy_head.layers.0.weight" in saved
    model = load_model(LEGACY / "matris-dcp", weights=weights)
    assert_same_outputs(_outputs(model, expected["structure"]), expected[f"matris-dcp:{weights}"])


def test_retired_keys_name_only_the_single_task_heads():
    """Loading drops exactly the old heads: a MatRIS parameter whose name starts like one (atom_refinement) stays."""
    config = MultiTaskConfig("matris-4m", [DatasetSpec("a")], backbone_options={"num_layers": 1, "atom_dim": 8,
                             "bond_dim": 8, "angle_dim": 8})
    model = MultiTaskModel(config)
    state = model.state_dict()
    stale = {**state, "backbone.atom_ref": torch.zeros(94), "backbone.energy_head.layers.0.weight": torch.zeros(1)}
    assert MultiTaskModel.load({"config": config.to_dict(), "state_dict": stale}).state_dict().keys() == state.keys()
    missing = {k: v for k, v in state.items() if ".atom_refinement." not in k}
    with pytest.raises(RuntimeError, match="atom_refinement"):
        MultiTaskModel.load({"config": config.to_dict(), "state_dict": missing})
