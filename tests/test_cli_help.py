"""Every verb's --help: examples that name real files and parse, and no torch or training stack imported to print it."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lampretrain import cli

REPO = Path(__file__).resolve().parent.parent
# argument destinations that name something the command reads (not what it writes)
INPUTS = {"recipe", "spec", "store", "checkpoint", "sources", "sweep", "target", "profile", "structure",
          "baseline_store"}


def _verbs() -> dict:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return {"": parser, **sub.choices}


def examples(help_text: str) -> list[list[str]]:
    """The argument lists of the `lampretrain ...` (or `... -m lampretrain.cli ...`) lines under "examples"."""
    found, inside, pending = [], False, ""
    for line in help_text.splitlines():
        if line.startswith("examples"):
            inside = True
            continue
        if inside and not line.strip():
            inside = False
        if not inside:
            continue
        pending += line.strip()
        if pending.endswith("\\"):  # a command continued on the next line
            pending = pending[:-1] + " "
            continue
        words, pending = shlex.split(pending), ""
        start = next(i for i, w in enumerate(words) if w in ("lampretrain", "lampretrain.cli"))
        found.append(words[start + 1:])
    return found


def _demo_outputs() -> set[str]:
    """What `lampretrain demo` writes with its defaults: the store and one run directory per demo model."""
    demo = _verbs()["demo"]
    output = demo.get_default("output")
    models = next(a.choices for a in demo._actions if a.dest == "model")
    return {f"{output}/store", *(f"{output}/{m}" for m in models)}


def _demo_datasets() -> set[str]:
    return {s["dataset"] for s in yaml.safe_load((REPO / "data_prep/demo.yaml").read_text())["sources"]}


ALL = [(verb or "lampretrain", argv) for verb, parser in _verbs().items() for argv in examples(parser.format_help())]


def test_every_verb_has_examples():
    with_examples = {verb for verb, _ in ALL}
    assert with_examples == {verb or "lampretrain" for verb in _verbs()}
    assert all(argv[0] == verb for verb, argv in ALL if verb != "lampretrain")  # each shows its own verb


@pytest.mark.parametrize("verb, argv", ALL, ids=[" ".join(a)[:60] for _, a in ALL])
def test_example_names_real_inputs_and_parses(verb, argv, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    args = cli.build_parser().parse_args(argv)  # unknown options, bad choices, missing arguments fail here
    demo_outputs, datasets = _demo_outputs(), _demo_datasets()
    for dest in INPUTS & set(vars(args)):
        values = getattr(args, dest)
        for value in values if isinstance(values, list) else [values]:
            if value is not None:
                assert value in demo_outputs or (REPO / value).exists(), f"{argv}: {dest} {value} does not exist"
    for name in [getattr(args, "dataset", None), *(getattr(args, "datasets", None) or [])]:
        if name is not None and any(v in demo_outputs for v in argv):  # a head of the demo model
            assert name in datasets, f"{argv}: the demo store has no dataset {name}"
    with pytest.raises(SystemExit) as exit_:  # bench: the benchmark's own parser
        cli.main([*argv, "--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_examples_reader_fails_on_a_missing_recipe(monkeypatch):
    """The check above catches an example naming a recipe that does not exist (as two launch examples once did)."""
    monkeypatch.chdir(REPO)
    argv = examples("examples:\n  lampretrain launch recipes/matris-10m.yaml --cluster slurm\n")[0]
    args = cli.build_parser().parse_args(argv)
    assert not (REPO / args.target).exists() and args.target not in _demo_outputs()


def test_help_imports_no_torch_and_no_training_stack():
    """What makes --help answer at once (timed by `lampretrain bench cli`): printing it imports none of these."""
    verbs = [v for v in _verbs() if v]
    code = (
        "import contextlib, io, json, sys\n"
        "from lampretrain.cli import main\n"
        f"for verb in {verbs!r}:\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main([verb, '--help'])\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'mlflow', 'ray') "
        "or m.startswith(('lampretrain.train', 'lampretrain.models', 'lampretrain.finetune.run')))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
