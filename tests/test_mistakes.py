"""Every mistake a user can make at the command line is one line on stderr naming the key or file, exit code 2.

Each row of :data:`MISTAKES` is a row of the reliability table in ``docs/reliability.md``: the arguments after
``lampretrain``, and a piece of the one line the user must see. The recipe rows are caught before a process
group or a model exists (``pretrain`` would print its start line otherwise, which the test rules out).
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from lampretrain import cli
from lampretrain.recipe import parse_recipe
from lampretrain.train import checkpoint as ckpt
from lampretrain.train import pretrain

from finetune_support import FEO, tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")

# (id, arguments with {recipe} {store} {run} {ckpt} {tmp} placeholders, a piece of the message)
MISTAKES = [
    ("recipe file missing", ["pretrain", "{tmp}/nope.yaml"], "nope.yaml: no such file"),
    ("recipe not YAML", ["pretrain", "{tmp}/bad.yaml"], "not valid YAML"),
    ("unknown recipe key", ["pretrain", "{recipe}", "--set", "trian.steps=3"], "unknown key 'trian'"),
    ("malformed --set", ["pretrain", "{recipe}", "--set", "train.steps"], "is not of the form key.path=value"),
    ("negative lr", ["pretrain", "{recipe}", "--set", "optim.lr=-1e-3"], "optim.lr: must be > 0"),
    ("zero steps", ["pretrain", "{recipe}", "--set", "train.steps=0"], "train.steps: must be >= 1"),
    ("checkpoint.every 0", ["pretrain", "{recipe}", "--set", "checkpoint.every=0"], "checkpoint.every: must be >= 1"),
    ("checkpoint.keep -1", ["pretrain", "{recipe}", "--set", "checkpoint.keep=-1"], "checkpoint.keep: must be >= 0"),
    ("ema_decay above 1", ["pretrain", "{recipe}", "--set", "train.ema_decay=1.5"], "ema_decay: must lie in (0, 1)"),
    ("loss weight given twice", ["pretrain", "{recipe}", "--set", "objective.options.energy_weight=3"],
     "objective.options.energy_weight: set objective.energy instead"),
    ("zero budget", ["pretrain", "{recipe}", "--set", "data.budget=0"], "data.budget: must be > 0"),
    ("warmup factor above 1", ["pretrain", "{recipe}", "--set", "schedule.warmup_start_factor=2"],
     "warmup_start_factor: must lie in [0, 1]"),
    ("string for a number", ["pretrain", "{recipe}", "--set", "optim.lr=fast"], "optim.lr: expected a number"),
    ("unknown engine", ["pretrain", "{recipe}", "--set", "engine.name=horovod"], "engine.name: 'horovod' is not allowed"),
    ("unknown model", ["pretrain", "{recipe}", "--set", "model.name=matris-1b"], "unknown model 'matris-1b'"),
    ("model.options typo", ["pretrain", "{recipe}", "--set", "model.options.num_layerz=2"],
     "model.options: unknown key 'num_layerz'; allowed keys: num_layers"),
    ("store path missing", ["pretrain", "{recipe}", "--set", "data.store={tmp}/no_store"],
     "no_store: not a lampretrain store (no manifest.json)"),
    ("unknown dataset", ["pretrain", "{recipe}", "--set", "data.datasets=[mp_pbeu, water]"],
     "data.datasets: 'water' is not a dataset of"),
    ("unknown dataset in ratios", ["pretrain", "{recipe}", "--set", "data.sampling={strategy: explicit, ratios: {water: 1}}"],
     "data.sampling.ratios: 'water' is not among the trained datasets"),
    ("max_natoms leaves nothing", ["pretrain", "{recipe}", "--set", "data.max_natoms=1"],
     "has no 'train' frames of mp_pbeu with at most 1 atoms"),
    ("--resume path missing", ["pretrain", "{recipe}", "--resume", "{tmp}/no_run"], "no_run: no such checkpoint or run directory"),
    ("--resume corrupt checkpoint", ["pretrain", "{recipe}", "--resume", "{corrupt}"], "does not match its SHA-256 (corrupted)"),
    ("--resume auto, all corrupt", ["pretrain", "{corrupt_recipe}", "--resume", "auto"],
     "--resume auto found 1 checkpoint(s) and none is usable"),
    ("evaluate: no checkpoint", ["evaluate", "{tmp}/no_run", "{store}"], "no_run: no such checkpoint or run directory"),
    ("evaluate: not a store", ["evaluate", "{ckpt}", "{tmp}/nothing.xyz"], "neither a store (manifest.json) nor a structure file"),
    ("evaluate: empty structure file", ["evaluate", "{ckpt}", "{tmp}/empty.xyz"], "empty.xyz: empty file"),
    ("export: unknown head", ["export", "{ckpt}", "{tmp}/m.pt2", "--dataset", "water"], "unknown dataset 'water'"),
    ("finetune: no checkpoint", ["finetune", "{ft_recipe}", "--from", "{tmp}/no_run"], "no_run: no such checkpoint"),
    ("inspect: not a store", ["inspect", "{tmp}"], "not a lampretrain store (no manifest.json)"),
    ("prep: spec missing", ["prep", "{tmp}/nope.yaml"], "nope.yaml: no such file"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    run = tiny_run(tmp_path_factory.mktemp("mistakes"), [{"path": str(FEO), "dataset": "mp_pbeu"}])
    root, store, recipe, good = run["root"], run["store"], run["recipe"], run["checkpoint"]
    corrupt_run = root / "corrupt_run"
    shutil.copytree(run["run"], corrupt_run)
    corrupt = next((corrupt_run / "checkpoints").glob("step-*"))
    shard = next(corrupt.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a tensor: same size, other SHA-256
    shard.write_bytes(bytes(data))
    (root / "corrupt_recipe.yaml").write_text(yaml.safe_dump(dict(recipe, output=str(corrupt_run))))
    (root / "ft.yaml").write_text(yaml.safe_dump({"name": "ft", "output": str(root / "ft"), "data": {"store": str(store)}}))
    (root / "bad.yaml").write_text("name: [unclosed\n")
    (root / "empty.xyz").write_text("")
    return {"tmp": root, "recipe": root / "recipe.yaml", "store": store, "ckpt": good, "corrupt": corrupt,
            "corrupt_recipe": root / "corrupt_recipe.yaml", "ft_recipe": root / "ft.yaml"}


@pytest.mark.parametrize("argv,expected", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_a_mistake_is_one_line_and_exit_code_2(world, capsys, argv, expected):
    for name, value in world.items():
        argv = [a.replace(f"{{{name}}}", str(value)) for a in argv]
    before = sorted(p.name for p in (world["tmp"] / "corrupt_run" / "checkpoints").iterdir())
    code = cli.main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    if argv[0] == "pretrain" and "--resume" not in argv:
        assert "[lampretrain]" not in captured.out, "a recipe mistake must be caught before training starts"
    # a refused resume leaves the broken run exactly as it was
    assert sorted(p.name for p in (world["tmp"] / "corrupt_run" / "checkpoints").iterdir()) == before


def test_debug_adds_the_traceback(world, capsys):
    assert cli.main(["--debug", "pretrain", str(world["recipe"]), "--set", "optim.lr=-1"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" in err and last.startswith("error: ") and "optim.lr: must be > 0" in last


def test_resume_fresh_keeps_the_broken_checkpoints_and_starts_at_step_0(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["tmp"] / "corrupt_run", run)
    broken = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    recipe = dict(yaml.safe_load(world["corrupt_recipe"].read_text()), output=str(run))
    result = pretrain(parse_recipe(recipe), resume="fresh")
    assert result.step == 1 and result.checkpoint.name == broken[-1]
    ckpt.verify(result.checkpoint)
    previous = list((run / "checkpoints").glob("previous-*"))
    assert len(previous) == 1 and sorted(p.name for p in previous[0].iterdir()) == broken
    with pytest.raises(ckpt.CheckpointError, match="SHA-256"):  # still the broken one, moved, not rewritten
        ckpt.verify(previous[0] / broken[-1])


def test_a_step_directory_not_written_by_this_run_is_set_aside_not_replaced(world, tmp_path):
    """A fresh run (no --resume) over an old run directory reaches the old step: the old one is kept."""
    run = tmp_path / "run"
    shutil.copytree(world["tmp"] / "run", run)
    old = next((run / "checkpoints").glob("step-*"))
    stamp = json.loads((old / ckpt.MARKER).read_text())
    recipe = dict(yaml.safe_load(world["recipe"].read_text()), output=str(run))
    with pytest.warns(RuntimeWarning, match="was not written by this run"):
        pretrain(parse_recipe(recipe))
    kept = next((run / "checkpoints").glob(f"previous-*/{old.name}"))
    assert json.loads((kept / ckpt.MARKER).read_text()) == stamp
