"""``lampretrain evaluate`` and ``lampretrain export``: accuracy tables and plots, and a standalone model file."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Iterator

import torch

from ..frames import Frame

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="energy/force/stress MAE and RMSE of a checkpoint per dataset, with plots",
        description="Evaluate CHECKPOINT (a trainer checkpoint directory, a run directory, or a saved model file) "
        "on SOURCES: prepared stores (the --split rows) or structure files any lampretrain reader takes. "
        "Prints a per-dataset table (energy meV/atom, forces meV/Å, stress GPa) with the mean baseline "
        "(mean per-atom energy after element references; zero forces and stress) and writes metrics.csv, "
        "parity_<dataset>.png and errors_<dataset>.png to --out.",
    )
    p.add_argument("checkpoint", help="checkpoint directory, run directory or MultiTaskModel.save file")
    p.add_argument("sources", nargs="+", help="store directories and/or structure files")
    p.add_argument("--split", default="val", choices=["train", "val", "test"], help="store split (default: %(default)s)")
    p.add_argument("--dataset", help="evaluate every frame with this dataset's head (default: each frame's own)")
    p.add_argument("--out", default="eval", help="output directory (default: %(default)s)")
    p.add_argument("--max-frames", type=int, help="evaluate at most this many frames per source")
    p.add_argument("--batch-size", type=int, default=16, help="structures per forward pass (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float64", help="(default: %(default)s)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="EMA or raw weights (default: %(default)s)")
    p.add_argument("--mlflow-run", metavar="ID", help="log metrics and files as artifacts to this MLflow run")
    p.add_argument("--mlflow-uri", help="tracking URI (default: the run's sqlite store next to the checkpoint, "
                   "else MLFLOW_TRACKING_URI)")

    p = subparsers.add_parser(
        "export",
        help="export one dataset head's energy/forces/stress function with torch.export",
        description="Trace CHECKPOINT's energy, forces (−∂E/∂x) and stress ((1/V)∂E/∂ε) for one dataset head into a "
        "torch.export program (.pt2) loadable with torch.export.load, no lampretrain model code needed. "
        "Inputs are the graph tensors of lampretrain.inference.export.INPUTS; the program is traced on (and keeps "
        "the sizes of) the first structure of --structure.",
    )
    p.add_argument("checkpoint", help="checkpoint directory, run directory or MultiTaskModel.save file")
    p.add_argument("output", help="the .pt2 file to write")
    p.add_argument("--dataset", required=True, help="dataset head to export")
    p.add_argument("--structure", required=True, help="structure file whose first frame fixes the traced sizes")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="(default: %(default)s)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="EMA or raw weights (default: %(default)s)")


def read_sources(sources: list[str], split: str, max_frames: int | None) -> Iterator[Frame]:
    """Frames of store directories (their ``split`` rows) and structure files, in order."""
    from ..graph.datasets import LmdbFrameDataset
    from ..io import read_frames
    from ..store.index import StoreIndex

    for source in sources:
        path = Path(source)
        if (path / "manifest.json").exists():
            frames = LmdbFrameDataset.from_index(StoreIndex.open(path), split)
            yield from (frames[i] for i in range(len(frames) if max_frames is None else min(max_frames, len(frames))))
        elif path.exists():
            yield from itertools.islice(read_frames(path), max_frames)
        else:
            raise FileNotFoundError(f"{source}: neither a store (manifest.json) nor a structure file")


def _mlflow_uri(checkpoint: Path, given: str | None) -> str | None:
    if given:
        return given
    for parent in [checkpoint, *checkpoint.resolve().parents][:4]:
        if (parent / "mlflow.db").exists():
            return f"sqlite:///{parent / 'mlflow.db'}"
    return None


def _log_mlflow(run_id: str, uri: str | None, rows: list[dict], files: list[Path]) -> None:
    import mlflow

    if uri:
        mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    for r in rows:
        for key in ("mae", "rmse", "baseline_mae", "baseline_rmse"):
            client.log_metric(run_id, f"eval/{r['dataset']}/{r['quantity']}_{key}", float(r[key]))
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path="evaluation")


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import format_table, metrics_table, predict, write_csv
    from .loading import load_model, resolve_checkpoint
    from .plots import write_plots

    checkpoint = resolve_checkpoint(args.checkpoint)
    model = load_model(checkpoint, args.weights)
    frames = read_sources(args.sources, args.split, args.max_frames)
    predictions = predict(model, frames, args.dataset, args.batch_size, args.device, DTYPES[args.dtype])
    if not predictions:
        print(f"error: no frames in {', '.join(args.sources)} (split {args.split})")
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = metrics_table(predictions)
    print(f"checkpoint {checkpoint}")
    print(format_table(rows))
    write_csv(rows, out / "metrics.csv")
    files = [out / "metrics.csv", *write_plots(predictions, out)]
    print(f"wrote {', '.join(str(f) for f in files)}")
    if args.mlflow_run:
        _log_mlflow(args.mlflow_run, _mlflow_uri(checkpoint, args.mlflow_uri), rows, files)
        print(f"logged to MLflow run {args.mlflow_run}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..io import read_frames
    from .export import example_inputs, export_model, save_exported
    from .loading import load_model

    model = load_model(args.checkpoint, args.weights)
    frame = next(iter(read_frames(args.structure)))
    program = export_model(model, args.dataset, example_inputs(frame, model, DTYPES[args.dtype]))
    save_exported(program, args.output)
    print(f"wrote {args.output} (dataset head '{args.dataset}', {args.dtype})")
    return 0


def run(args: argparse.Namespace) -> int:
    return {"evaluate": _evaluate, "export": _export}[args.command](args)
