"""Fine-tuning from a pretrained checkpoint: change-bias, kept and copied heads, freezing, LR decay, replay, LoRA.

A tiny MatRIS is pretrained in-process on real DFT fixtures (FeO PBE+U and Al r2SCAN
relaxations from VASP, the first 24 structures of the fairchem oxides ASE db); fine-tuning data are single
fixtures prepared with the same ``prep`` pipeline.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lampretrain.finetune import finetune, parse_finetune
from lampretrain.finetune.lora import LoRALinear, add_lora, fold_lora
from lampretrain.finetune.model import freeze, lr_scales
from lampretrain.inference.loading import load_model
from lampretrain.models import graph_cutoffs
from lampretrain.models.multitask import MultiTaskModel
from lampretrain.recipe import parse_recipe
from lampretrain.train import pretrain
from lampretrain.train.references import energy_errors, store_batches

from finetune_support import AL, FEO, REPO, make_store, oxides_slice, tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ft")
    oxides = oxides_slice(root, 24)
    store = make_store(root / "pre_store", [
        {"path": str(FEO), "dataset": "mp_pbeu"},
        {"path": str(oxides), "dataset": "oxides_pbe"},
    ])
    import signal

    before = signal.getsignal(signal.SIGTERM)
    result = pretrain(parse_recipe(tiny_recipe(store, root / "pre", 12)))
    # an in-process run must leave the preemption handlers as it found them (forked children inherit them)
    assert signal.getsignal(signal.SIGTERM) is before
    return {
        "root": root, "store": store, "checkpoint": result.checkpoint,
        "feo": make_store(root / "feo_store", [{"path": str(FEO), "dataset": "feo"}]),
        "al": make_store(root / "al_store", [{"path": str(AL), "dataset": "al_r2scan"}]),
    }


def ft_recipe(pre: dict, store: Path, name: str, steps: int, **finetune) -> dict:
    return {
        "name": name, "output": str(pre["root"] / name),
        "data": {"store": str(store), "budget": 64, "max_natoms": 32},
        "optim": {"lr": 2e-3}, "schedule": {"kind": "constant"},
        "train": {"steps": steps, "progress": False, "log_every": 1},
        "checkpoint": {"every": steps, "keep": 1}, "tracking": {"enabled": False},
        "finetune": finetune,
    }


def mae(model: MultiTaskModel, store: Path, data_name: str, head: str) -> float:
    batches = store_batches(str(store), {data_name: 0}, "train", 32, cutoffs=graph_cutoffs(model))
    return energy_errors(model, (model.for_dataset(b, head) for b in batches)).energy_per_atom_mae


def test_checkpoint_recipe_fills_missing_sections_and_needs_a_checkpoint(pretrained):
    from lampretrain.config import ConfigError

    with pytest.raises(ConfigError, match="no checkpoint to fine-tune"):
        parse_finetune({"name": "x", "data": {"store": "s"}})
    recipe = parse_finetune(ft_recipe(pretrained, pretrained["feo"], "r", 3), pretrained["checkpoint"],
                            ["finetune.freeze=backbone", "optim.lr=1e-4"])
    assert recipe.model.name == "matris-4m" and recipe.model.options["atom_dim"] == 16  # from the checkpoint
    assert recipe.finetune.freeze == "backbone" and recipe.optim.lr == 1e-4 and recipe.train.steps == 3
    with pytest.raises(ConfigError, match="lr_decay"):
        parse_finetune(ft_recipe(pretrained, pretrained["feo"], "r", 3, lr_decay=0.0), pretrained["checkpoint"])
    run_dir = Path(pretrained["checkpoint"]).parent.parent  # --from a run directory: its newest checkpoint
    assert Path(parse_finetune(ft_recipe(pretrained, pretrained["feo"], "r", 3), str(run_dir)).finetune.checkpoint) \
        == Path(pretrained["checkpoint"])
    with pytest.raises(ConfigError, match="fine-tuning refits its head's references before step 0"):
        parse_finetune(ft_recipe(pretrained, pretrained["feo"], "r", 3), pretrained["checkpoint"],
                       ["train.refit_references=8"])


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("finetune-*.yaml")), ids=lambda p: p.name)
def test_shipped_finetune_recipes_validate(pretrained, path):
    from lampretrain.finetune import load_finetune

    recipe = load_finetune(path, pretrained["checkpoint"])
    assert (recipe.finetune.head or recipe.property.csv) and recipe.train.steps > 0 and recipe.model.name == "matris-4m"


def test_loaded_checkpoint_reproduces_the_pretrained_model(pretrained):
    """The DCP model equals the trainer's final weights: its train-window energy MAE matches a fresh evaluation."""
    model = load_model(pretrained["checkpoint"])
    assert model.dataset_names == ["mp_pbeu", "oxides_pbe"]
    assert model.references.table.dtype == torch.float64
    feo = mae(model, pretrained["store"], "mp_pbeu", "mp_pbeu")
    assert np.isfinite(feo) and feo > 0


def test_step0_error_after_change_bias_is_no_worse_than_pretrained(pretrained):
    """Existing head kept (FeO on mp_pbeu) and a new head copied from oxides_pbe (Al r2SCAN): refit before step 0."""
    pre = load_model(pretrained["checkpoint"])
    kept = parse_finetune(ft_recipe(pretrained, pretrained["feo"], "ft-kept", 1, head="mp_pbeu"), pretrained["checkpoint"])
    result = finetune(kept, max_steps=1)
    base = mae(pre, pretrained["feo"], "feo", "mp_pbeu")
    assert result.report.step0_mae_pretrained == pytest.approx(base, rel=1e-6)  # the head was kept, not reset
    assert result.report.step0_mae <= base + 1e-9
    assert set(result.report.reference_shift) == {8, 26}  # O and Fe

    new = parse_finetune(ft_recipe(pretrained, pretrained["al"], "ft-new", 1, head="al", init_from="oxides_pbe"),
                         pretrained["checkpoint"])
    result = finetune(new, max_steps=1)
    base = mae(pre, pretrained["al"], "al_r2scan", "oxides_pbe")
    assert result.report.step0_mae_pretrained == pytest.approx(base, rel=1e-6)  # the copy predicts like its source
    assert result.report.step0_mae <= base
    assert result.report.step0_mae < 0.5 * base  # a different functional: the offset is most of the error
    exported = MultiTaskModel.load(result.exported)
    assert exported.dataset_names == ["mp_pbeu", "oxides_pbe", "al"]
    meta = json.loads((Path(new.output) / "finetune.json").read_text())
    assert meta["step"] == 1


def test_freeze_and_layerwise_decay(pretrained):
    model = load_model(pretrained["checkpoint"])
    frozen = freeze(model, "blocks", 1)
    assert any(n.startswith("backbone.blocks.0.") for n in frozen)
    assert not any(n.startswith("backbone.blocks.1.") for n in frozen)
    assert any(n.startswith("backbone.atom_embedding") for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("energy_heads"))
    scales = lr_scales(model, 0.5)
    assert scales["backbone.blocks.1.node_mlp.layers.0.weight" if "backbone.blocks.1.node_mlp.layers.0.weight" in scales
                  else next(n for n in scales if n.startswith("backbone.blocks.1."))] == 0.5
    assert scales[next(n for n in scales if n.startswith("backbone.blocks.0."))] == 0.25
    assert scales[next(n for n in scales if n.startswith("backbone.atom_embedding"))] == 0.125
    whole = load_model(pretrained["checkpoint"])
    freeze(whole, "backbone")
    assert not any(p.requires_grad for p in whole.backbone.parameters())


def test_lora_starts_at_the_pretrained_model_and_folds_back_exactly(pretrained):
    model = load_model(pretrained["checkpoint"])
    batch = next(store_batches(str(pretrained["feo"]), {"feo": 0}, "train", 32, cutoffs=graph_cutoffs(model)))
    before = model(batch, dataset="mp_pbeu")["energy"].detach()
    assert add_lora(model.backbone, rank=2, alpha=4.0) > 0
    assert torch.allclose(model(batch, dataset="mp_pbeu")["energy"].detach(), before)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.05)
    adapted = model(batch, dataset="mp_pbeu")["energy"].detach()
    assert not torch.allclose(adapted, before)
    fold_lora(model.backbone)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(model(batch, dataset="mp_pbeu")["energy"].detach(), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora", [0, 2])
def test_export_is_the_final_checkpoints_ema_model(pretrained, lora):
    """With train.ema_decay the exported model holds the run's moving average, read whole from the final
    checkpoint (adapters folded in), not the live module's raw weights."""
    from lampretrain.train import checkpoint as ckpt

    data = ft_recipe(pretrained, pretrained["feo"], f"ft-ema-{lora}", 3, head="mp_pbeu", lora={"rank": lora, "alpha": 4.0})
    data["train"]["ema_decay"] = 0.9
    result = finetune(parse_finetune(data, pretrained["checkpoint"]))
    exported = MultiTaskModel.load(result.exported)
    trained = copy.deepcopy(exported)  # the module as it trained: adapters unfolded
    if lora:
        add_lora(trained.backbone, lora, 4.0)
    params = dict(trained.named_parameters())
    saved = ckpt.read_metadata(result.run.checkpoint).state_dict_metadata
    tensors = {"model": {n: torch.empty_like(p) for n, p in params.items()},
               "ema": {n: torch.empty_like(p) for n, p in params.items() if f"ema.{n}" in saved}}
    ckpt.load(result.run.checkpoint, tensors)
    ema, raw = tensors["ema"], tensors["model"]
    changed = [n for n in ema if not torch.equal(ema[n], raw[n])]
    assert any(n.startswith("energy_heads") for n in changed), changed  # the average lags the trained weights
    if lora:
        assert any(n.endswith("lora_b") for n in changed)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(ema.get(n, raw[n]))  # a parameter the run did not train is not averaged
    fold_lora(trained.backbone)
    expected = dict(trained.named_parameters())
    assert expected.keys() == dict(exported.named_parameters()).keys()
    for n, p in exported.named_parameters():
        assert torch.equal(p, expected[n]), n


def test_replay_limits_forgetting_on_a_pretraining_dataset(pretrained):
    """Fine-tune hard on Al (new head, lr 1e-2): FeO (PBE+U) error rises less with it replayed on its own head."""
    pre = load_model(pretrained["checkpoint"])
    start = mae(pre, pretrained["store"], "mp_pbeu", "mp_pbeu")
    rises = {}
    for ratio in (0.0, 0.5):
        data = ft_recipe(pretrained, pretrained["al"], f"ft-replay-{ratio}", 10, head="al", init_from="oxides_pbe",
                         replay={"store": str(pretrained["store"]), "ratio": ratio, "datasets": ["mp_pbeu"]})
        data["optim"]["lr"] = 1e-2
        result = finetune(parse_finetune(data, pretrained["checkpoint"]))
        tuned = MultiTaskModel.load(result.exported)
        rises[ratio] = mae(tuned, pretrained["store"], "mp_pbeu", "mp_pbeu") - start
    assert rises[0.5] < rises[0.0], rises


def test_mixed_data_builds_main_and_replay_graphs_at_the_given_cutoffs(pretrained):
    """Fine-tuning's stream (new data + replay) follows the model's cutoffs, as pretraining's does."""
    from lampretrain.finetune.run import MixedData
    from lampretrain.graph.batch import edge_vectors
    from lampretrain.train.data import build_train_data

    def data(store):
        return build_train_data(parse_recipe(tiny_recipe(store, pretrained["root"] / "unused", 1)).data, 0, 1, seed=0)

    mixed = MixedData(data(pretrained["feo"]), torch.tensor([0]), data(pretrained["store"]), torch.tensor([0, 1]), 0.5)
    mixed.use_cutoffs(3.0, 2.0)
    stream = mixed.stream(0, 0)
    for _ in range(2):  # one new batch, then one replay batch
        _, _, batch = next(stream)
        lengths = edge_vectors(batch.positions, batch.cell, batch).norm(dim=-1)
        assert batch.num_edges > 0 and lengths.max() < 3.0
        assert batch.num_angles == 0 or lengths[batch.angle_index].max() < 2.0


def test_change_bias_command_refits_every_head_and_saves_a_model_that_reproduces_it(pretrained, tmp_path, capsys):
    """`lampretrain change-bias CKPT STORE --out F`: each head's train MAE can only go down (LAD refit); the saved
    model loads with the shifted references and predicts what the refit model in memory predicts."""
    from lampretrain.cli import main
    from lampretrain.train.references import refit_store_references

    model = load_model(pretrained["checkpoint"])
    refits = refit_store_references(model, str(pretrained["store"]))
    assert [r.dataset for r in refits] == ["mp_pbeu", "oxides_pbe"]
    assert all(r.mae_after <= r.mae_before + 1e-9 and r.frames > 0 for r in refits)
    assert any(abs(d) > 1e-6 for r in refits for d in r.delta.values())

    out = tmp_path / "refit.pt"
    assert main(["change-bias", str(pretrained["checkpoint"]), str(pretrained["store"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mp_pbeu" in printed and "oxides_pbe" in printed and str(out) in printed
    saved = MultiTaskModel.load(out).eval()
    for name in ("mp_pbeu", "oxides_pbe"):
        assert mae(saved, pretrained["store"], name, name) == pytest.approx(mae(model, pretrained["store"], name, name),
                                                                           rel=1e-6)
