"""A few full trainer steps per model: the real ``pretrain`` loop (sampler, loader, engine, EMA, metrics), one rank.

    lampretrain bench train --store outputs/demo/store --model dpa4-neo matris-4m --steps 10

The recipe is the scaling benchmark's (:func:`lampretrain.bench.scaling.bench_recipe`: the demo-sized
``--tiny`` models, cost budget per step, no tracking, no checkpoint inside the run), run in this
process with a world of one. After ``--warmup`` steps one metric window covers the ``--steps``
measured ones. Prints one JSON line per model::

    bench, impl, model, device, steps, step_time_s, atoms_per_s, graphs_per_s, loss

Without ``--store`` the bundled fixtures (data_prep/demo.yaml) are prepared into a temporary store first.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

from .. import resources
from .common import emit, peak_rss_mb, reset_peak_rss
from .prep import DEMO_SPEC


def demo_store(root: Path) -> Path:
    """The bundled fixtures prepared into ``root/store`` (one worker, quiet)."""
    from ..prep.pipeline import prepare
    from ..prep.spec import load_spec

    spec = load_spec(DEMO_SPEC, {"output": str(root / "store")}, base=resources.root())
    with contextlib.redirect_stdout(sys.stderr):
        prepare(spec, workers=1, progress=False, overwrite=True)
    return root / "store"


def train_steps(args: argparse.Namespace, model: str, store: Path, out: Path) -> dict:
    import torch

    from ..recipe import parse_recipe
    from ..train import pretrain
    from .scaling import bench_recipe

    recipe_args = argparse.Namespace(
        store=str(store), model=model, tiny=args.tiny, device=args.device, budget=args.budget,
        max_natoms=args.max_natoms, workers=args.workers, threads=args.threads, warmup=args.warmup, steps=args.steps,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    reset_peak_rss()
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's own log lines; stdout carries JSON
        result = pretrain(parse_recipe(bench_recipe(recipe_args, out)))
    m = result.last_metrics
    return {
        "bench": "train", "impl": "lampretrain", "model": model, "tiny": args.tiny, "device": args.device,
        "engine": "ddp", "ranks": 1, "steps": args.steps, "budget": args.budget,
        "step_time_s": m["step_time_s"], "atoms_per_s": m["atoms_per_s"], "graphs_per_s": m["graphs_per_s"],
        "loss": m.get("loss"), "threads": torch.get_num_threads(), "peak_rss_mb": peak_rss_mb(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lampretrain bench train", description=__doc__.split("\n")[0])
    p.add_argument("--store", help="a prepared store (default: the bundled fixtures, prepared into a temporary store)")
    p.add_argument("--model", nargs="+", default=["dpa4-neo", "matris-4m"])
    p.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=True, help="the demo-sized models (default)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--budget", type=float, default=96.0, help="atoms per step")
    p.add_argument("--max-natoms", type=int, default=48)
    p.add_argument("--workers", type=int, default=0, help="loader processes")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lampretrain-bench-train-") as tmp:
        tmp = Path(tmp)
        store = Path(args.store) if args.store else demo_store(tmp)
        for model in args.model:
            emit(train_steps(args, model, store, tmp / f"run-{model}"), args.json_out)
    return 0
