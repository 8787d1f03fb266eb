"""A typo in any section of a pretraining, fine-tuning or sweep recipe is one line naming the key path and the
allowed keys, exit code 2, before any process group, data loader or Ray exists.

Every nested schema section is found from the dataclasses themselves, so a section added later is covered too.
"""

from __future__ import annotations

import dataclasses
import json
from typing import get_args, get_type_hints

import pytest
import yaml

from lampretrain import cli
from lampretrain.finetune.recipe import FinetuneRecipe
from lampretrain.finetune.sweep import SweepSpec
from lampretrain.recipe import Recipe

from finetune_support import FEO, tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")

TYPO = "colour"
# sections whose values are free-form or typed by another schema (tested below by their own rows)
FREE = {"engine.deepspeed", "data.sampling.ratios", "objective.options", "model.options", "model.heads", "space"}


def sections(cls: type, prefix: str = "") -> list[str]:
    """Dotted paths of every dataclass-typed section under ``cls``."""
    out = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        options = [tp, *get_args(tp)]
        nested = next((t for t in options if dataclasses.is_dataclass(t)), None)
        if nested is not None:
            path = f"{prefix}{f.name}"
            out += [path, *sections(nested, path + ".")]
    return out


# sections that are dicts in the recipe but validated by a schema of their own
TYPED_DICTS = ["model.options", "model.heads", "model.heads.denoising", "objective.options"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    run = tiny_run(tmp_path_factory.mktemp("typos"), [{"path": str(FEO), "dataset": "mp_pbeu"}])
    root, store, recipe, ckpt = run["root"], run["store"], run["recipe"], run["checkpoint"]
    ft = {"name": "ft", "output": str(root / "ft"), "data": {"store": str(store)},
          "train": {"steps": 1, "progress": False}, "tracking": {"enabled": False}}
    (root / "ft.yaml").write_text(yaml.safe_dump(ft))
    sweep = {"name": "sw", "output": str(root / "sw"), "recipe": str(root / "ft.yaml"), "checkpoint": str(ckpt),
             "space": {"optim.lr": {"choice": [1e-3]}}, "metric": "val_mae"}
    (root / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return {"root": root, "recipe": recipe, "ft": ft, "sweep": sweep, "ckpt": ckpt}


def _with_typo(data: dict, path: str) -> dict:
    data = json.loads(json.dumps(data))
    node = data
    for part in path.split("."):
        if not isinstance(node.get(part), dict):  # absent or null: the section with only the typo
            node[part] = {}
        node = node[part]
    node[TYPO] = 1
    return data


def _run(argv: list[str], capsys) -> str:
    code = cli.main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "[lampretrain]" not in captured.out, "caught only after training started"
    return lines[0]


@pytest.mark.parametrize("path", sorted(set(sections(Recipe)) - FREE) + TYPED_DICTS)
def test_pretraining_recipe_typo(world, tmp_path, capsys, path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(_with_typo(world["recipe"], path)))
    line = _run(["pretrain", str(tmp_path / "r.yaml")], capsys)
    assert f"{path}: unknown key '{TYPO}'" in line and "allowed keys: " in line, line


@pytest.mark.parametrize("path", sorted(set(sections(FinetuneRecipe)) - set(sections(Recipe)) - FREE))
def test_finetuning_recipe_typo(world, tmp_path, capsys, path):
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(_with_typo(world["ft"], path)))
    line = _run(["finetune", str(tmp_path / "f.yaml"), "--from", str(world["ckpt"])], capsys)
    assert f"{path}: unknown key '{TYPO}'" in line and "allowed keys: " in line, line


@pytest.mark.parametrize("path", sorted(set(sections(SweepSpec)) - FREE) + [""])
def test_sweep_spec_typo(world, tmp_path, capsys, path):
    data = json.loads(json.dumps(world["sweep"]))
    if path:
        data = _with_typo(data, path)
    else:
        data[TYPO] = 1
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    line = _run(["sweep", str(tmp_path / "s.yaml")], capsys)
    where = f"{path}: " if path else ""
    assert f"{where}unknown key '{TYPO}'" in line and "allowed keys: " in line, line


def test_a_typo_in_a_searched_key_names_it(world, tmp_path, capsys):
    data = dict(world["sweep"], space={"optim.lrr": {"choice": [1e-3]}})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    line = _run(["sweep", str(tmp_path / "s.yaml")], capsys)
    assert "space.optim.lrr" in line and "unknown key 'lrr'" in line, line


def test_every_section_is_covered():
    """The parametrisations above are not empty and reach the nested sections."""
    assert {"data", "data.cost", "data.sampling", "optim", "train", "checkpoint"} <= set(sections(Recipe))
    assert {"finetune", "finetune.replay", "finetune.lora", "property"} <= set(sections(FinetuneRecipe))
