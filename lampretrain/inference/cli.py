"""``lampretrain evaluate``, ``export`` and ``import``: accuracy tables and plots, a standalone model file, other codes' checkpoints."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..config import ConfigError

if TYPE_CHECKING:
    from ..frames import Frame

# torch dtypes by name: this module builds the --help of `lampretrain evaluate`/`export`, which must not import torch
DTYPES = ("float32", "float64")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="energy/force/stress MAE and RMSE of a checkpoint per dataset, with plots",
        description="Evaluate CHECKPOINT (a trainer checkpoint directory, a run directory, or a saved model file) "
        "on SOURCES: prepared stores (the --split rows) or structure files any lampretrain reader takes. "
        "Prints a per-dataset table (energy meV/atom, forces meV/Å, stress GPa) with the mean baseline "
        "(training statistics: element references + mean per-atom residual from stats.json of --baseline-store, "
        "else the checkpoint's training store, else the evaluated stores, else the model's references; zero forces "
        "and stress); a score no better than the baseline's is marked '!'. Writes metrics.csv, metrics.txt, "
        "summary.png (a parity panel per dataset and quantity, energies as the deviation from the baseline), "
        "parity_<dataset>.png and errors_<dataset>.png to --out.",
        epilog="examples (after `lampretrain demo`):\n"
        "  lampretrain evaluate outputs/demo/matris outputs/demo/store --split val --out outputs/demo/eval\n"
        "  lampretrain evaluate outputs/demo/matris tests/data/real/fairchem_oxides_asedb/oxides.db "
        "--dataset oxides_pbe --max-frames 20",
    )
    p.add_argument("checkpoint", help="checkpoint directory, run directory or MultiTaskModel.save file")
    p.add_argument("sources", nargs="+", help="store directories and/or structure files")
    p.add_argument("--split", default="val", choices=["train", "val", "test"], help="store split (default: %(default)s)")
    p.add_argument("--dataset", help="evaluate every frame with this dataset's head (default: each frame's own)")
    p.add_argument("--out", default="eval", help="output directory (default: %(default)s)")
    p.add_argument("--max-frames", type=int, help="evaluate at most this many frames per source")
    p.add_argument("--batch-size", type=int, default=16, help="structures per forward pass (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="precision of the forward pass (default: %(default)s; float64 is about twice as slow on a CPU)")
    p.add_argument("--float64", dest="dtype", action="store_const", const="float64", help="same as --dtype float64")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="EMA or raw weights (default: %(default)s)")
    p.add_argument("--baseline-store", metavar="DIR", help="store whose stats.json (training statistics) gives the "
                   "energy baseline (default: the checkpoint's training store when it still exists)")
    p.add_argument("--mlflow-run", metavar="ID", help="log metrics, the table and the files as artifacts to this MLflow run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--mlflow-uri", help="tracking URI (default: the run's sqlite store next to the checkpoint, "
                   "else MLFLOW_TRACKING_URI)")

    p = subparsers.add_parser(
        "export",
        help="export one dataset head's energy/forces/stress function with torch.export",
        description="Trace CHECKPOINT's energy, forces (−∂E/∂x) and stress ((1/V)∂E/∂ε) for one dataset head into a "
        "torch.export program (.pt2) loadable with torch.export.load, no lampretrain model code needed. "
        "Inputs are the graph tensors of lampretrain.inference.export.INPUTS for any number of atoms, edges and "
        "graphs (periodic or not); the cutoffs to build them with are saved in the file's lampretrain.json.",
        epilog="examples (after `lampretrain demo`):\n"
        "  lampretrain export outputs/demo/matris model.pt2 --dataset mlearn_pbe\n"
        "  lampretrain export outputs/demo/matris water.pt2 --dataset water "
        "--structure tests/data/real/fairchem_oxides_asedb/oxides.db",
    )

    p.add_argument("checkpoint", help="checkpoint directory, run directory or MultiTaskModel.save file")
    p.add_argument("output", help="the file to write")
    p.add_argument("--format", default="pt2", help="pt2 (default), or a format of `lampretrain import`: matris (the "
                   "official MatRIS checkpoint MatRISCalculator loads), deepmd (a deepmd-kit checkpoint)")
    p.add_argument("--dataset", help="dataset head to export (required for pt2 and for a model with several heads)")
    p.add_argument("--structure", help="structure file whose first frame (periodic, ≥ 2 atoms) is traced "
                   "(default: rattled rock-salt NaCl); the program is not limited to its size")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="(default: %(default)s)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="EMA or raw weights (default: %(default)s)")

    p = subparsers.add_parser(
        "import",
        help="turn a published checkpoint of another code (official MatRIS, deepmd-kit DPA4) into a lampretrain one",
        description="Read SRC, a checkpoint of FORMAT (matris: the official MatRIS {config, state_dict} files, "
        "e.g. the release MatRIS_10M_OAM.pth.tar, or a release name such as matris_10m_oam found in "
        "~/.cache/lampretrain/published or ~/.cache/matris; deepmd: a deepmd-kit 3.x model.ckpt.pt whose descriptor is "
        "DPA4), without running code from it, and write the checkpoint directory OUT (model.pt, import.json: source "
        "file, sha256, its settings). Calculator(OUT), evaluate, export and finetune --from take OUT; the model is "
        "the published function: one head per dataset of the source with its element references. "
        "`lampretrain export OUT FILE --format matris` writes it back.",
        epilog="examples:\n"
        "  lampretrain import matris tests/data/matris_official/matris_1.0.0_small.pth.tar --out outputs/matris-small\n"
        "  lampretrain import matris matris_10m_oam --out models/matris-10m-oam\n"
        "  lampretrain import deepmd model.ckpt.pt --out models/dpa4",
    )
    p.add_argument("format", help="matris or deepmd")
    p.add_argument("source", help="checkpoint file, or a release name (matris_10m_oam, matris_4m_matpes_pbev2, ...)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")


def read_sources(
    sources: list[str], split: str, max_frames: int | None, heads: list[str] | None = None
) -> Iterator[Frame]:
    """Frames of store directories (their ``split`` rows) and structure files, in order.

    With ``heads``, a store's rows of other datasets are left out (and named on stdout):
    a model trained on some of a store's datasets is evaluated on those.
    """
    import numpy as np

    from ..graph.datasets import LmdbFrameDataset
    from ..io import read_frames
    from ..store.index import StoreIndex

    for source in sources:
        path = Path(source)
        if _is_store(path):
            index = StoreIndex.open(path)
            unheaded = [n for n in index.datasets if heads is not None and n not in heads]
            left = index.select(split, unheaded, required=False)
            if len(left):
                counts = np.bincount(left.heads, minlength=len(unheaded))
                named = ", ".join(f"{n} ({c})" for n, c in zip(unheaded, counts) if c)
                print(f"{source}: no head for {named} {split} frames; not evaluated")
            chosen = index.select(split, [n for n in index.datasets if n not in unheaded], required=False)
            frames = LmdbFrameDataset.from_rows(index, split, chosen.rows[:max_frames])
            yield from (frames[i] for i in range(len(frames)))
        elif path.exists():
            yield from itertools.islice(read_frames(path), max_frames)
        else:
            raise ConfigError(f"{source}: neither a store (manifest.json) nor a structure file")


def _is_store(path: Path) -> bool:
    return (path / "manifest.json").exists()


def energy_baselines(checkpoint: Path, baseline_store: str | None, sources: list[str]) -> dict:
    """Energy baseline per dataset name from training statistics (``stats.json``); the first store naming a dataset wins.

    Stores in order: ``baseline_store``, the checkpoint's training store, the evaluated stores.
    """
    from ..store.index import StoreIndex
    from ..train import checkpoint as ckpt
    from .evaluate import EnergyBaseline

    stores: list[Path] = []
    if baseline_store:
        if not _is_store(Path(baseline_store)):
            raise ConfigError(f"--baseline-store {baseline_store}: not a store (no manifest.json)")
        stores.append(Path(baseline_store))
    if checkpoint.is_dir():
        trained_on = ckpt.read_meta(checkpoint)["recipe"]["data"].get("store")
        if trained_on and _is_store(Path(trained_on)):
            stores.append(Path(trained_on))
    stores += [Path(s) for s in sources if _is_store(Path(s))]
    baselines: dict = {}
    for store in stores:
        for name, stats in StoreIndex.open(store).stats().items():
            if name not in baselines and "element_references" in stats:
                baselines[name] = EnergyBaseline.from_stats(stats, f"{store}/stats.json [{name}]")
    return baselines


def _mlflow_uri(checkpoint: Path, given: str | None) -> str | None:
    if given:
        return given
    for parent in [checkpoint, *checkpoint.resolve().parents][:4]:
        if (parent / "mlflow.db").exists():
            return f"sqlite:///{parent / 'mlflow.db'}"
    return None


def log_mlflow(run_id: str, uri: str | None, rows: list[dict], files: list[Path]) -> None:
    """Metrics ``eval/<dataset>/<metric>``, ``eval/<dataset>/baseline/<metric>`` (the row's MAE and RMSE
    metrics, reporting units) and ``eval/<dataset>/<metric>_worse_than_baseline`` (1: no better than the mean
    baseline), the table as an MLflow table (``evaluation/metrics.json``) and every file under ``evaluation/``."""
    import warnings

    from mlflow import MlflowClient

    with warnings.catch_warnings():
        # MLflow's own deprecated calls (its sqlalchemy store's `noload`, log_table's pandas select_dtypes), which
        # the user can do nothing about: exactly these two messages are silenced
        warnings.filterwarnings("ignore", "The ``noload`` loader strategy is deprecated")
        warnings.filterwarnings("ignore", "For backward compatibility, 'str' dtypes are included by select_dtypes")
        _log_mlflow(MlflowClient(uri), run_id, rows, files)


def _log_mlflow(client, run_id: str, rows: list[dict], files: list[Path]) -> None:
    client.get_run(run_id)  # an unknown run fails here, naming the id, before anything is logged
    for r in rows:
        for kind in ("mae", "rmse"):
            client.log_metric(run_id, f"eval/{r['dataset']}/{r[f'{kind}_metric']}", float(r[kind]))
            client.log_metric(run_id, f"eval/{r['dataset']}/baseline/{r[f'{kind}_metric']}", float(r[f"baseline_{kind}"]))
            client.log_metric(run_id, f"eval/{r['dataset']}/{r[f'{kind}_metric']}_worse_than_baseline",
                              float(r[f"{kind}_worse_than_baseline"]))
    client.log_table(run_id, {key: [r[key] for r in rows] for key in rows[0]}, "evaluation/metrics.json")
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path="evaluation")


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from .evaluate import format_table, metrics_table, predict, write_csv
    from .loading import load_model, resolve_checkpoint
    from .plots import write_plots

    checkpoint = resolve_checkpoint(args.checkpoint)
    model = load_model(checkpoint, args.weights)
    baselines = energy_baselines(checkpoint, args.baseline_store, args.sources)
    heads = None if args.dataset else model.dataset_names
    frames = read_sources(args.sources, args.split, args.max_frames, heads)
    predictions = predict(model, frames, args.dataset, args.batch_size, args.device, getattr(torch, args.dtype),
                          baselines, progress=not args.quiet)
    if not predictions:
        print(f"error: no frames in {', '.join(args.sources)} (split {args.split})")
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = metrics_table(predictions)
    table = format_table(rows)
    print(f"checkpoint {checkpoint}")
    print(table)
    write_csv(rows, out / "metrics.csv")
    (out / "metrics.txt").write_text(f"checkpoint {checkpoint}\n{table}\n")
    files = [out / "metrics.csv", out / "metrics.txt", *write_plots(predictions, out)]
    print(f"wrote {', '.join(str(f) for f in files)}")
    if args.mlflow_run:
        log_mlflow(args.mlflow_run, _mlflow_uri(checkpoint, args.mlflow_uri), rows, files)
        print(f"logged to MLflow run {args.mlflow_run}")
    return 0


def _tracing_frame(structure: str | None) -> Frame:
    from ase.build import bulk

    from ..io import read_frames
    from .calculator import atoms_to_frame

    if structure:
        return next(iter(read_frames(structure)))
    atoms = bulk("NaCl", "rocksalt", a=5.64)
    atoms.rattle(0.05, seed=0)
    return atoms_to_frame(atoms)


def _import(args: argparse.Namespace) -> int:
    from ..models.foreign import import_checkpoint
    from .loading import load_model

    out = import_checkpoint(args.format, args.source, args.out)
    model = load_model(out)
    heads = ", ".join(model.dataset_names)
    print(f"wrote {out} ({model.config.backbone}, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"heads: {heads}); e.g. lampretrain evaluate {out} STRUCTURES --dataset {model.dataset_names[0]}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import time

    import torch

    from .export import export_metadata, export_model, save_exported, tracing_example
    from .loading import load_model

    model = load_model(args.checkpoint, args.weights)
    if args.format != "pt2":
        from ..models.foreign import get_format

        get_format(args.format).write(model, Path(args.output), args.dataset)
        print(f"wrote {args.output} ({args.format} format, head '{args.dataset or model.dataset_names[0]}')")
        return 0
    if args.dataset is None:
        raise ConfigError(f"export: --dataset is required for pt2; this model has: {', '.join(model.dataset_names)}")
    model.dataset_index(args.dataset)  # an unknown head fails before the slow trace
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    program = export_model(model, args.dataset, tracing_example(_tracing_frame(args.structure), model, dtype))
    save_exported(program, args.output, export_metadata(model, args.dataset, dtype))
    print(f"wrote {args.output} (dataset head '{args.dataset}', {args.dtype}, any number of atoms/edges/graphs; "
          f"exported in {time.perf_counter() - start:.1f} s)")
    return 0


def run(args: argparse.Namespace) -> int:
    return {"evaluate": _evaluate, "export": _export, "import": _import}[args.command](args)
