"""Render a results file (JSON lines of ``lampretrain bench``) as a Markdown summary and a PNG plot.

    lampretrain bench summary benchmarks/results/2026-11-22-cpu2-xeon.jsonl

Writes ``<results>-summary.md`` and ``<results>-summary.png`` next to the results (or ``--markdown`` /
``--png``) and prints the Markdown. A results file collects a day of runs on one machine: for each
measured case (benchmark, implementation, model, sizes, mode, device, ...) the latest line counts.
The plot shows atoms/s per model and structure size, ours beside each peer, and every ratio
against a peer (> 1: lampretrain is faster).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# the keys that name a measured case; every other key is a measurement
CASE_KEYS = ("bench", "impl", "peer", "model", "tiny", "n_structures", "atoms", "mode", "device", "dtype", "compile",
             "format", "access", "workers", "ranks", "strategy", "engine", "structure")


def load(path: str | Path) -> list[dict[str, Any]]:
    """The lines of ``path``, the latest one per case, in first-seen order; a malformed line names its number."""
    latest: dict[tuple, dict] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON line ({err.msg})") from None
        if "bench" not in record:
            continue  # annotations such as {"tag": ...}
        latest[tuple(str(record.get(k)) for k in CASE_KEYS)] = record
    return list(latest.values())


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    if not rows:
        return []
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return out + [""]


def _model_case(r: dict) -> tuple:
    return (r["model"], r["atoms"], r["mode"], r["device"], r.get("dtype"), r.get("compile"))


def ratios(records: list[dict]) -> list[dict[str, Any]]:
    """Every lampretrain-vs-peer comparison in ``records``: bench, case, ours, peer, theirs, unit, ratio (> 1: ours faster)."""
    out = []
    ours = {(r["bench"], r.get("format")): r for r in records if r.get("impl") == "lampretrain" and "bench" in r}
    models = {_model_case(r): r for r in records if r["bench"] == "model" and r.get("impl") == "lampretrain"}
    for r in records:
        impl = r.get("impl")
        if impl in (None, "lampretrain") or "skipped" in r:
            continue
        if r["bench"] == "model" and _model_case(r) in models:
            mine = models[_model_case(r)]
            case = f"{r['model']} {r['mode']}, {r['atoms']} atoms, {r['device']} {r.get('dtype', 'float32')}"
            out.append(dict(bench="model", case=case, ours=mine["atoms_per_s"], peer=impl, theirs=r["atoms_per_s"],
                            unit="atoms/s"))
        elif r["bench"] == "prep" and ("prep", None) in ours:
            out.append(dict(bench="prep", case="frames/s per worker", ours=ours[("prep", None)]["frames_per_s_per_worker"],
                            peer=impl, theirs=r["frames_per_s_per_worker"], unit="frames/s"))
        elif r["bench"] == "read" and ("read", "lmdb") in ours:
            out.append(dict(bench="read", case="random read + decode", ours=ours[("read", "lmdb")]["frames_per_s"],
                            peer=impl, theirs=r["frames_per_s"], unit="frames/s"))
        elif r["bench"] == "loader":
            mine = [m for m in records if m["bench"] == "loader" and m.get("impl") == "lampretrain"]
            for m in mine:
                where = f"{m['workers']} workers, per worker" if m["workers"] else "in the main process"
                out.append(dict(bench="loader", case=f"{m['format']}, {where}",
                                ours=m["graphs_per_s_per_worker"], peer=impl, theirs=r["graphs_per_s_per_worker"],
                                unit="graphs/s"))
    for row in out:
        row["ratio"] = row["ours"] / row["theirs"] if row["theirs"] else float("nan")
    return out


def markdown(records: list[dict], source: str = "") -> str:
    machines = sorted({r["machine"] for r in records if "machine" in r})
    dates = sorted({r["date"] for r in records if "date" in r})
    loads = [r["load1"] for r in records if isinstance(r.get("load1"), (int, float))]
    lines = [f"# Benchmark summary{f' of `{source}`' if source else ''}", ""]
    if machines or dates:
        load_text = f"; load average (1 min) during the runs {min(loads):.1f}–{max(loads):.1f}" if loads else ""
        lines += [f"Machine {', '.join(machines) or '?'}, {', '.join(dates) or '?'}{load_text}.", ""]
    for r in records:
        if r["bench"] == "all" and "wall_s" in r:
            per = ", ".join(f"{k} {v:.0f} s" for k, v in r["seconds"].items())
            lines += [f"`lampretrain bench all{' --quick' if r['quick'] else ''}` on {r['device']}: "
                      f"{r['wall_s']:.0f} s wall ({per}).", ""]
    rows = [[r["bench"], r["case"], r["ours"], r["peer"], r["theirs"], r["unit"], f"{r['ratio']:.2f}×"]
            for r in ratios(records)]
    if rows:
        lines += ["## Against the peers (ratio > 1: lampretrain is faster)", ""]
        lines += _table(["bench", "case", "lampretrain", "peer", "peer value", "unit", "ratio"], rows)
    model_rows = [[r["model"], r.get("impl"), r.get("params"), r["atoms"], r.get("edges"), r.get("angles"), r["mode"],
                   r["device"], r.get("dtype"), r["atoms_per_s"], r.get("median_s_per_step"), r.get("peak_rss_mb")]
                  for r in records if r["bench"] == "model" and "atoms_per_s" in r]
    if model_rows:
        lines += ["## Model step (all structures of the file as one batch; E, F, σ)", ""]
        lines += _table(["model", "impl", "params", "atoms", "edges", "angles", "mode", "device", "dtype", "atoms/s",
                         "s/step", "peak MB"], model_rows)
    sections = [
        ("Largest structure that fits", "model_max_fit",
         ["model", "mode", "dtype", "repeat", "atoms", "peak_cuda_mb", "atoms_per_s"]),
        ("Trainer steps (one rank)", "train", ["model", "tiny", "device", "steps", "step_time_s", "atoms_per_s"]),
        ("Scaling", "scaling", ["model", "ranks", "device", "step_time_s", "atoms_per_s", "efficiency"]),
        ("Trainer overhead over a bare step", "trainer_overhead", ["model", "trainer_step_s", "bare_step_s", "overhead"]),
        ("Rank balance (simulated MPtrj sizes)", "balance", ["ranks", "strategy", "max_over_mean", "dropped"]),
        ("Prep", "prep", ["impl", "workers", "frames", "frames_per_s", "frames_per_s_per_worker"]),
        ("Read-back", "read", ["impl", "format", "access", "frames", "frames_per_s"]),
        ("Loader (graphs built in the loop)", "loader", ["impl", "format", "workers", "graphs_per_s", "edges_per_s"]),
    ]
    for title, bench, keys in sections:
        rows = [[r.get(k) for k in keys] for r in records if r["bench"] == bench and "skipped" not in r]
        if rows:
            lines += [f"## {title}", ""] + _table(keys, rows)
    cost = [r for r in records if r["bench"] == "cost" and "r2" in r]
    if cost:
        lines += ["## Cost model fit (seconds per step = a·atoms + b·edges + c·angles + d)", ""]
        lines += _table(["model", "mode", "batches", "R²", "a (s/atom)", "b (s/edge)", "c (s/angle)", "d (s)",
                         "atom-unit cost (a, b, c)"],
                        [[r["model"], r["mode"], r["batches"], r["r2"], r["seconds_per"]["atoms"],
                          r["seconds_per"]["edges"], r["seconds_per"]["angles"], r["seconds_per"]["batch"],
                          ", ".join(_fmt(v) for v in r["cost"].values())] for r in cost])
    skipped = list({(r["bench"], r["peer"], r["skipped"]): None for r in records if "skipped" in r})
    if skipped:
        lines += ["## Peers not run here", ""] + _table(["bench", "peer", "reason"], skipped)
    errors = [[r.get("kind", r["bench"]), r["error"]] for r in records if "error" in r]
    if errors:
        lines += ["## Benchmarks that failed", ""] + _table(["benchmark", "error"], errors)
    return "\n".join(lines)


def plot(records: list[dict], png: str | Path) -> Path:
    """Atoms/s per model and structure size (ours and peers, log scale) and the ratios against peers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [r for r in records if r["bench"] == "model" and "atoms_per_s" in r]
    cases = sorted({_model_case(r) for r in models}, key=lambda c: (c[0], c[1], c[2], str(c[4])))
    impls = sorted({r["impl"] for r in models}, key=lambda i: (i != "lampretrain", i))
    table = ratios(records)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(len(impls), 1)
    for k, impl in enumerate(impls):
        xs, ys = [], []
        for i, case in enumerate(cases):
            hit = [r for r in models if r["impl"] == impl and _model_case(r) == case]
            if hit:
                xs.append(i + (k - (len(impls) - 1) / 2) * width)
                ys.append(hit[0]["atoms_per_s"])
        ax.bar(xs, ys, width, label=impl, hatch=None if impl == "lampretrain" else "//")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"{c[0]}\n{c[1]} atoms\n{c[2]} {c[4] or ''}" for c in cases], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("atoms/s (E, F, σ per step)")
    ax.set_title("Model step throughput")
    if impls:
        ax.legend(fontsize=8)
    labels = [f"{r['bench']}: {r['case']} vs {r['peer']}" for r in table]
    bx.barh(range(len(table)), [r["ratio"] for r in table], color="tab:green")
    bx.axvline(1.0, color="k", lw=0.8)
    if table:
        bx.set_xscale("log")  # ratios span 0.5× .. 100×
    bx.set_yticks(range(len(table)))
    bx.set_yticklabels(labels, fontsize=7)
    for i, r in enumerate(table):
        bx.text(r["ratio"], i, f" {r['ratio']:.2f}×", va="center", fontsize=7)
    bx.set_xlabel("lampretrain / peer (> 1: faster)")
    bx.set_title("Ratios against peers")
    machines = sorted({r["machine"] for r in records if "machine" in r})
    dates = sorted({r["date"] for r in records if "date" in r})
    fig.suptitle(" ".join(machines + dates), fontsize=9)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def render(results: str | Path, md_out: str | Path | None = None, png_out: str | Path | None = None) -> tuple[str, Path, Path]:
    """Markdown text, Markdown file and PNG file of ``results`` (default outputs next to it)."""
    results = Path(results)
    records = load(results)
    if not records:
        raise ValueError(f"{results}: no benchmark lines to summarise")
    stem = results.with_suffix("")
    md_path = Path(md_out) if md_out else stem.with_name(stem.name + "-summary.md")
    png_path = Path(png_out) if png_out else stem.with_name(stem.name + "-summary.png")
    text = markdown(records, source=results.name)
    png_path = plot(records, png_path)
    text += f"\n![atoms/s and ratios]({png_path.name})\n"
    md_path.write_text(text)
    return text, md_path, png_path


def main(argv: list[str] | None = None) -> int:
    from .common import default_results_path

    p = argparse.ArgumentParser(prog="lampretrain bench summary", description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="?", help="a results file (default: today's for this machine)")
    p.add_argument("--markdown", help="where to write the Markdown (default: <results>-summary.md)")
    p.add_argument("--png", help="where to write the plot (default: <results>-summary.png)")
    args = p.parse_args(argv)
    results = Path(args.results) if args.results else default_results_path()
    if not results.exists():
        raise SystemExit(f"{results}: no such results file (run `lampretrain bench all --quick` first)")
    text, md_path, png_path = render(results, args.markdown, args.png)
    print(text)
    print(f"[lampretrain] summary written to {md_path} and {png_path}")
    return 0
