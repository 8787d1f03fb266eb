"""Every benchmark in one command, then the summary (Markdown table + PNG).

    lampretrain bench all --quick        small sizes: < 10 minutes on a 2-core CPU
    lampretrain bench all                the sizes behind docs/performance.md
    lampretrain bench all --device cuda  the model steps on the GPU (fp32 and bf16, largest structure that fits)

Benchmarks run one after the other in this process (the scaling benchmark starts its own torchrun
ranks), each with its peers side by side where installed. A benchmark that fails is reported as a
``{"bench": "all", "kind": ..., "error": ...}`` line and the others still run. The last line gives
the wall time of each benchmark and of the whole suite.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import tempfile
import time
import traceback
from pathlib import Path

from .. import resources
from . import BENCHES
from .common import emit, reset_peak_rss, results_file

OXIDES = resources.path("tests/data/real/fairchem_oxides_asedb/oxides.db")


def structure_files(root: Path) -> dict[int, Path]:
    """One real oxide crystal of 6 and of 24 atoms (fairchem oxides fixture), each as an extxyz file."""
    import ase.io

    from ..io import read_frames

    files = {}
    for frame in read_frames(OXIDES):
        if frame.natoms in (6, 24) and frame.natoms not in files:
            files[frame.natoms] = root / f"oxide-{frame.natoms}.extxyz"
            ase.io.write(files[frame.natoms], frame.to_atoms(), format="extxyz")
    return files


def plan(args: argparse.Namespace, files: dict[int, Path], store: Path) -> list[tuple[str, list[str]]]:
    """(kind, argv) of every benchmark run, at quick or full size."""
    threads = ["--threads", str(args.threads)] if args.threads else []
    quick = args.quick
    small, large = str(files[6]), str(files[24])
    runs: list[tuple[str, list[str]]] = [
        ("prep", ["--workers", "1"]),
        ("loader", ["--batches", "20" if quick else "100", "--seconds-ase", "3" if quick else "10"]),
        ("balance", ["--ranks", "8", "64"] if quick else []),
    ]
    repeat = ["--repeat", "2", "--warmup", "1"] if quick else ["--repeat", "5", "--warmup", "2"]
    models = [("matris-4m", small), ("matris-10m", small), ("dpa4-neo", small), ("dpa4-air", small),
              ("dpa4-neo", large)]
    if not quick:
        models += [("matris-10m", large), ("dpa4-air", large), ("dpa4-plus", large)]
    device = ["--device", args.device]
    for model, path in models:
        runs.append(("model", ["--model", model, "--structures", path, *device, *repeat, *threads]))
    trained = ("matris-4m", "dpa4-neo") if quick else ("matris-10m", "dpa4-air")
    runs += [("model", ["--model", m, "--structures", small, "--mode", "train", *device, *repeat, *threads])
             for m in trained]
    if args.device == "cuda":
        for model in ("matris-10m", "dpa4-air"):
            runs.append(("model", ["--model", model, "--structures", small, *device, "--dtype", "bfloat16", *repeat]))
            runs.append(("model", ["--model", model, "--structures", small, *device, "--mode", "train", "--max-fit",
                                   *repeat]))
    steps = ["--warmup", "2", "--steps", "5"] if quick else ["--warmup", "5", "--steps", "20"]
    runs.append(("train", ["--store", str(store), "--device", args.device, *steps, *threads]))
    runs.append(("scaling", ["--store", str(store), "--device", args.device, "--ranks", "1", "2", *steps]))
    runs.append(("cost", ["--batches", "8", "--max-frames", "2", "--repeat", "1", *threads] if quick
                 else ["--batches", "16", "--repeat", "3", *threads]))
    return runs


def run_one(kind: str, argv: list[str]) -> None:
    reset_peak_rss()
    importlib.import_module(BENCHES[kind]).main(argv)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lampretrain bench all", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (< 10 minutes on a 2-core CPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the model, train and cost steps (default: 1 on CPU, where a shared "
                   "machine makes OpenMP threads wait on each other; the torch default on CUDA)")
    p.add_argument("--only", nargs="+", metavar="KIND", help="run only these benchmarks (prep, loader, ...)")
    p.add_argument("--store", help="a prepared store for train/scaling (default: the bundled fixtures, prepared)")
    args = p.parse_args(argv)
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="lampretrain-bench-all-") as tmp:
        tmp = Path(tmp)
        files = structure_files(tmp)
        store = Path(args.store) if args.store else tmp / "store"
        runs = [(k, a) for k, a in plan(args, files, store) if not args.only or k in args.only]
        if not args.store and any(k in ("train", "scaling") for k, _ in runs):
            from .train import demo_store

            demo_store(tmp)
        for kind, bench_argv in runs:
            t0 = time.perf_counter()
            print(f"[lampretrain] bench {kind} {' '.join(bench_argv)}", file=sys.stderr, flush=True)
            try:
                run_one(kind, bench_argv)
            except (Exception, SystemExit) as err:  # one failure must not hide the other figures
                traceback.print_exc(file=sys.stderr)
                emit({"bench": "all", "kind": kind, "argv": bench_argv, "error": f"{type(err).__name__}: {err}"})
            seconds[kind] = round(seconds.get(kind, 0.0) + time.perf_counter() - t0, 1)
    emit({"bench": "all", "quick": args.quick, "device": args.device, "wall_s": round(time.perf_counter() - start, 1),
          "seconds": seconds})
    if results_file() is not None and results_file().exists():
        from .summary import render

        with contextlib.redirect_stdout(sys.stderr):
            text, md_path, png_path = render(results_file())
        print(text)
        print(f"[lampretrain] summary written to {md_path} and {png_path}", file=sys.stderr)
    return 0
