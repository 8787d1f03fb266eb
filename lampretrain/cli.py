"""The ``lampretrain`` command line.

    lampretrain demo                      the main job on embedded defaults (bundled real DFT data)
    lampretrain prep SPEC.yaml            raw DFT files → sharded LMDB + WebDataset store
    lampretrain inspect STORE             what a store holds (index, statistics, prep report)
    lampretrain bench KIND ...            benchmarks printing JSON lines
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from .config import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHES = {
    "prep": "lampretrain.bench.prep",
    "loader": "lampretrain.bench.loader",
    "balance": "lampretrain.bench.balance",
    "model": "lampretrain.bench.model_step",
}


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
    skipped = report["skipped"]
    print(
        f"store {output}: {report['frames_in']} frames in, {report['written']} written "
        f"({', '.join(f'{k} {v}' for k, v in report['per_split'].items())}), "
        f"skipped: {skipped['invalid']} invalid, {skipped['duplicate']} duplicate, {skipped['read_error']} unreadable "
        f"[{report['seconds']:.1f} s]"
    )
    for item in report["skipped_records"][:20]:
        print(f"  skipped {item['source']}: {item['reason']}")
    if len(report["skipped_records"]) > 20:
        print(f"  ... {len(report['skipped_records']) - 20} more in {output}/report.json")


def _inspect(args: argparse.Namespace) -> int:
    from .store.index import SPLITS, StoreIndex

    index = StoreIndex.open(args.store)
    print(f"{args.store}: {len(index)} frames, datasets {', '.join(index.datasets)}")
    for k, name in enumerate(index.datasets):
        rows = index.dataset == k
        per_split = ", ".join(f"{s} {int((rows & (index.split == j)).sum())}" for j, s in enumerate(SPLITS))
        print(f"  {name}: {per_split}; atoms {int(index.natoms[rows].sum())}, edges {int(index.n_edges[rows].sum())}")
    print(json.dumps(index.stats(), indent=1))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .prep.pipeline import prepare
    from .prep.spec import load_spec

    spec_path = REPO_ROOT / "data_prep" / "demo.yaml"
    if not spec_path.exists():
        raise ConfigError(f"{spec_path} not found: run the demo from a checkout of the lampretrain repository")
    spec = load_spec(spec_path, {"output": str(Path(args.output) / "store")})
    report = prepare(spec, workers=args.workers, overwrite=True)
    _print_report(spec.output, report)
    return 0


def _bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCHES[args.kind])
    return module.main(args.options) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lampretrain",
        description="Pretraining of large atomistic models: data prep, training, fine-tuning, benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run the main job on the bundled real DFT data (no servers)")
    p.add_argument("--output", default="outputs/demo", help="where the demo writes (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: all cores)")

    p = sub.add_parser(
        "prep",
        help="convert raw DFT files into a sharded LMDB + WebDataset store",
        description="Read the sources of SPEC (see data_prep/*.yaml), validate, deduplicate, split by content hash, "
        "and write shards, index, statistics and a report. Re-running after a crash resumes.",
    )
    p.add_argument("spec", help="prep spec YAML")
    p.add_argument("--output", help="override the spec's output directory")
    p.add_argument("--workers", type=int, default=None, help="local worker processes (default: all cores)")
    p.add_argument("--ray-address", help="run the workers on this Ray cluster (e.g. 'auto' or 'ray://head:10001')")
    p.add_argument("--overwrite", action="store_true", help="rebuild a store that is already complete")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("inspect", help="summarise a prepared store")
    p.add_argument("store", help="store directory (holds manifest.json)")

    p = sub.add_parser(
        "bench",
        help="benchmarks printing one JSON line each",
        description="Benchmarks: prep, loader, balance, model. Options after KIND go to that benchmark "
        "(`lampretrain bench prep --help`).",
    )
    p.add_argument("kind", choices=sorted(BENCHES), help="which benchmark")
    p.add_argument("options", nargs=argparse.REMAINDER, help="options of that benchmark")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return {"prep": _prep, "inspect": _inspect, "demo": _demo, "bench": _bench}[args.command](args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
