"""The ``lampretrain`` command line.

    lampretrain demo                      the main job on embedded defaults (bundled real DFT data)
    lampretrain prep SPEC.yaml            raw DFT files → sharded LMDB + WebDataset store
    lampretrain pretrain RECIPE.yaml      train (one process, or under torchrun / the deepspeed launcher)
    lampretrain finetune RECIPE.yaml      fine-tune a pretrained checkpoint (--from CKPT)
    lampretrain sweep SWEEP.yaml          many fine-tuning trials on Ray Tune (ASHA), MLflow child runs, best exported
    lampretrain change-bias CKPT STORE    refit each head's element references on a store, save the model
    lampretrain evaluate CKPT DATA        per-dataset MAE/RMSE vs the mean baseline, parity plots
    lampretrain export CKPT               torch.export of energy/forces/stress for one dataset head (or --format matris)
    lampretrain import FORMAT SRC         a published MatRIS / deepmd-kit checkpoint → a lampretrain one
    lampretrain inspect STORE             what a store holds (index, statistics, prep report)
    lampretrain launch RECIPE.yaml        render/submit a multi-node job (Slurm, Ray on Slurm, Kubernetes, local)
    lampretrain bench KIND ...            benchmarks printing JSON lines
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

# Only what builds the parsers is imported here: `lampretrain VERB --help` must answer at once (benchmark:
# `lampretrain bench cli`), and torch with the training stack takes seconds to import. Each verb imports its own.
from .bench import BENCHES
from .errors import EXIT_USAGE, UserError, one_line
from .finetune.cli import add_parser as add_finetune_parser
from .inference.cli import add_parser as add_inference_parser
from .launch.cli import add_parser as add_launch_parser


class HelpFormatter(argparse.HelpFormatter):
    """Prose paragraphs are refilled to the terminal; a paragraph with indented lines (examples, option tables) is
    printed as written, so a command line is never broken in the middle."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.strip("\n").split("\n\n"):
            lines = paragraph.splitlines()
            if any(line.startswith(" ") for line in lines):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(super()._fill_text(paragraph, width, indent))
        return "\n\n".join(paragraphs)


class Parser(argparse.ArgumentParser):
    """The ``lampretrain`` parser and every verb's (argparse gives subparsers their parent's class)."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def _prep(args: argparse.Namespace) -> int:
    from .prep.pipeline import prepare
    from .prep.spec import load_spec

    overrides = {"output": args.output} if args.output else None
    spec = load_spec(args.spec, overrides)
    report = prepare(
        spec, workers=args.workers, ray_address=args.ray_address, progress=not args.quiet, overwrite=args.overwrite
    )
    _print_report(spec.output, report)
    return 0


def _print_report(output: str, report: dict) -> None:
    from .prep.pipeline import census_lines

    skipped = report["skipped"]
    census = census_lines(report)
    alarms = [line for line in census if not line.startswith("  ")]  # a dataset without forces comes first
    for line in alarms:
        print(line)
    print(
        f"store {output}: {report['frames_in']} frames in, {report['written']} written "
        f"({', '.join(f'{k} {v}' for k, v in report['per_split'].items())}), "
        f"skipped: {skipped['invalid']} invalid, {skipped['duplicate']} duplicate, {skipped['read_error']} unreadable "
        f"[{report['seconds']:.1f} s]"
    )
    print("labels per dataset (share of written frames, source keys):")
    for line in census[len(alarms):]:
        print(line)
    for kind, items in (("skipped", report["skipped_records"]), ("warning", report.get("warnings", []))):
        for item in items[:20]:
            print(f"  {kind} {item['source']}: {item['reason']}")
        if len(items) > 20:
            print(f"  ... {len(items) - 20} more {kind}s in {output}/report.json")


def _inspect(args: argparse.Namespace) -> int:
    from .store.index import SPLITS, StoreIndex

    index = StoreIndex.open(args.store)
    print(f"{args.store}: {len(index)} frames, datasets {', '.join(index.datasets)}")
    for k, name in enumerate(index.datasets):
        rows = index.dataset == k
        per_split = ", ".join(f"{s} {int((rows & (index.split == j)).sum())}" for j, s in enumerate(SPLITS))
        print(f"  {name}: {per_split}; atoms {int(index.natoms[rows].sum())}, edges {int(index.n_edges[rows].sum())}")
    report_path = Path(args.store) / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if "labels" in report:  # a store prepared before the label census has none to print
        from .prep.pipeline import census_lines

        print("labels per dataset (share of written frames, source keys):")
        for line in census_lines(report):
            print(line)
    print(json.dumps(index.stats(), indent=1))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from . import resources
    from .prep.pipeline import prepare
    from .prep.spec import load_spec

    store = Path(args.output) / "store"  # relative to the working directory, wherever the package lives
    spec = load_spec(resources.path("data_prep/demo.yaml"), {"output": str(store)}, base=resources.root())
    report = prepare(spec, workers=args.workers, overwrite=False)
    _print_report(spec.output, report)
    recipe_path = resources.path(f"recipes/demo-{args.model}.yaml")
    overrides = [f"data.store={store}", f"output={Path(args.output) / args.model}", *args.set]
    return _run_pretrain(recipe_path, overrides, resume="auto", max_steps=None)


def _run_pretrain(recipe_path, overrides: list[str], resume: str | None, max_steps: int | None) -> int:
    from .recipe import load_recipe
    from .train import pretrain

    recipe = load_recipe(recipe_path, overrides)
    result = pretrain(recipe, resume=resume, max_steps=max_steps)
    if result.mlflow_run_id is not None:  # rank 0
        state = "preempted at" if result.preempted else "finished at"
        print(f"[lampretrain] {recipe.name} {state} step {result.step}")
        print(f"  checkpoint: {result.checkpoint}")
        print(f"  MLflow run: {result.mlflow_run_id} in {result.mlflow_uri}")
        if result.mlflow_uri.startswith("sqlite:"):
            print(f"  browse:     mlflow ui --backend-store-uri {result.mlflow_uri}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    return _run_pretrain(args.recipe, args.set, args.resume, args.max_steps)


def _bench(args: argparse.Namespace) -> int:
    from .bench.common import pop_save_options, set_results_file

    module = importlib.import_module(BENCHES[args.kind])
    options, results = pop_save_options(args.options)
    previous = set_results_file(None if args.kind == "summary" else results)
    try:
        return module.main(options) or 0
    finally:
        set_results_file(previous)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="lampretrain",
        description="Pretraining of large atomistic models: data prep, training, fine-tuning, benchmarks. "
        "`lampretrain COMMAND --help` shows each command's options and examples.",
        epilog="examples:\n"
        "  lampretrain demo --set train.steps=50\n"
        "  lampretrain inspect outputs/demo/store\n"
        "  lampretrain evaluate outputs/demo/matris outputs/demo/store --out outputs/demo/eval",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error as well as its one-line message")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="run the main job on the bundled real DFT data (no servers)",
        description="Prepare the bundled real DFT fixtures into OUTPUT/store (data_prep/demo.yaml) and pretrain the "
        "demo recipe (recipes/demo-MODEL.yaml) into OUTPUT/MODEL, resuming a run that is already there.",
        epilog="examples:\n"
        "  lampretrain demo --set train.steps=50\n"
        "  lampretrain demo --model dpa4 --output outputs/demo --workers 2",
    )
    p.add_argument("--output", default="outputs/demo", help="where the demo writes (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: all cores)")
    p.add_argument("--model", choices=["matris", "dpa4"], default="matris", help="which demo recipe (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, e.g. train.steps=50")

    p = sub.add_parser(
        "pretrain",
        help="pretrain a model from a recipe (DDP, FSDP2 or DeepSpeed; one CPU to many nodes)",
        description="Validate RECIPE (recipes/*.yaml) and train; SIGTERM/SIGUSR1 write a checkpoint and exit. "
        "Multi-process: under torchrun (below) or the deepspeed launcher.",
        epilog="examples:\n"
        "  lampretrain pretrain recipes/demo-matris.yaml --set train.steps=50\n"
        "  torchrun --nproc_per_node 8 -m lampretrain.cli pretrain recipes/matris-10m-omat24-salex-mptrj.yaml "
        "--resume auto",
    )
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.lr=3e-4")
    p.add_argument("--resume", help="'auto' (the run's newest valid checkpoint; refuses when it has only broken "
                   "ones), 'fresh' (start over, earlier checkpoints moved to checkpoints/previous-<time>/), "
                   "or a checkpoint or run directory")
    p.add_argument("--max-steps", type=int, help="stop at this step (the schedule still follows train.steps)")

    p = sub.add_parser(
        "prep",
        help="convert raw DFT files into a sharded LMDB + WebDataset store",
        description="Read the sources of SPEC (see data_prep/*.yaml), validate, deduplicate, split by content hash, "
        "and write shards, index, statistics and a report. Re-running after a crash resumes.",
        epilog="examples:\n"
        "  lampretrain prep data_prep/demo.yaml --output outputs/demo/store --workers 2\n"
        "  lampretrain prep data_prep/omat24.yaml --ray-address auto",
    )
    p.add_argument("spec", help="prep spec YAML")
    p.add_argument("--output", help="override the spec's output directory")
    p.add_argument("--workers", type=int, default=None, help="local worker processes (default: all cores)")
    p.add_argument("--ray-address", help="run the workers on this Ray cluster (e.g. 'auto' or 'ray://head:10001')")
    p.add_argument("--overwrite", action="store_true", help="rebuild a store that is already complete")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "inspect",
        help="summarise a prepared store",
        description="Print what STORE holds: frames per dataset and split, atoms and edges, the label census of "
        "its prep report and the per-dataset statistics (element references, RMS).",
        epilog="examples:\n"
        "  lampretrain inspect outputs/demo/store",
    )
    p.add_argument("store", help="store directory (holds manifest.json)")

    p = sub.add_parser(
        "bench",
        help="benchmarks printing JSON lines, saved to benchmarks/results/<date>-<machine>.jsonl",
        description="Benchmarks: prep, loader, balance, model, train, scaling, cost, cli; `all [--quick]` runs each "
        "and renders a summary (Markdown table + PNG), `summary [RESULTS.jsonl]` renders one. Options after KIND go to "
        "that benchmark (`lampretrain bench prep --help`); every benchmark also takes `--results PATH` (append the "
        "JSON lines there instead of benchmarks/results/<date>-<machine>.jsonl) and `--no-save` (print only).",
        epilog="examples:\n"
        "  lampretrain bench cli --repeat 3\n"
        "  lampretrain bench balance --ranks 64 --strategy cost --no-save\n"
        "  lampretrain bench all --quick",
    )
    p.add_argument("kind", choices=sorted(BENCHES), help="which benchmark")
    p.add_argument("options", nargs=argparse.REMAINDER, help="options of that benchmark")

    add_finetune_parser(sub)
    add_inference_parser(sub)
    add_launch_parser(sub)
    return parser


# command → "module:function", imported only for the command that runs
COMMANDS = {
    "prep": "lampretrain.cli:_prep",
    "inspect": "lampretrain.cli:_inspect",
    "demo": "lampretrain.cli:_demo",
    "pretrain": "lampretrain.cli:_pretrain",
    "bench": "lampretrain.cli:_bench",
    "launch": "lampretrain.launch.cli:run",
    "finetune": "lampretrain.finetune.cli:run",
    "sweep": "lampretrain.finetune.cli:run",
    "change-bias": "lampretrain.finetune.cli:run",
    "evaluate": "lampretrain.inference.cli:run",
    "export": "lampretrain.inference.cli:run",
    "import": "lampretrain.inference.cli:run",
}


def main(argv: list[str] | None = None) -> int:
    """Run one command; a :class:`UserError` is printed as one line (``error: ...``) with exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    module, function = COMMANDS[args.command].split(":")
    try:
        return getattr(importlib.import_module(module), function)(args)
    except KeyboardInterrupt:  # Ctrl-C: the last checkpoint stands (SIGTERM/SIGUSR1 write one first)
        print("interrupted; a run continues from its last checkpoint with --resume auto", file=sys.stderr)
        return 130
    except UserError as err:
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"error: {_rank_prefix()}{one_line(str(err))}", file=sys.stderr)
        return EXIT_USAGE


def _rank_prefix() -> str:
    """``[rank R] `` under a multi-process launcher, so a mistake seen by one rank only is still attributed."""
    import os

    return f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
