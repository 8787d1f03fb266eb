"""Parity plots and error histograms of an evaluation, as PNG files (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .evaluate import QUANTITIES, SCALE, Predictions  # noqa: E402

LABELS = {"energy": "energy per atom", "forces": "force component", "stress": "stress component"}
NATURAL = {"energy": ("eV/atom", 1.0), "forces": ("eV/Å", 1.0), "stress": ("GPa", SCALE["stress"])}


def _present(p: Predictions) -> list[str]:
    return [q for q in QUANTITIES if p.arrays(q)[0].size]


def parity_plot(p: Predictions, path: Path) -> Path:
    """One panel per quantity: predicted vs reference with the y = x line and the MAE in the title."""
    quantities = _present(p)
    fig, axes = plt.subplots(1, len(quantities), figsize=(4.2 * len(quantities), 4.0), squeeze=False)
    for ax, q in zip(axes[0], quantities):
        true, pred = p.arrays(q)
        mae, _ = p.scores(q)
        unit, s = NATURAL[q]
        true, pred = true * s, pred * s
        lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", lw=1)
        ax.scatter(true, pred, s=12 if true.size < 1000 else 4, alpha=0.6, edgecolors="none")
        ax.set_title(f"{LABELS[q]} ({true.size} values)\nMAE {mae:.3g} {QUANTITIES[q]}", fontsize=10)
        ax.set_xlabel(f"reference ({unit})")
        ax.set_ylabel(f"predicted ({unit})")
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_aspect("equal")
    fig.suptitle(f"{p.dataset}: {p.n_frames} frames")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def error_histogram(p: Predictions, path: Path) -> Path:
    """One panel per quantity: histogram of predicted − reference in reporting units.

    Counts go on a log axis only when they span more than two decades; the zero line is
    drawn only when zero lies among the errors (a biased model keeps a readable x range).
    """
    quantities = _present(p)
    fig, axes = plt.subplots(1, len(quantities), figsize=(4.2 * len(quantities), 3.8), squeeze=False)
    for ax, q in zip(axes[0], quantities):
        true, pred = p.arrays(q)
        error = (pred - true) * SCALE[q]
        counts, _, _ = ax.hist(error, bins=int(np.clip(np.sqrt(error.size), 10, 60)), color="tab:blue", alpha=0.8)
        if error.min() <= 0.0 <= error.max():
            ax.axvline(0.0, color="0.3", lw=1)
        if counts.max() > 100 * max(counts[counts > 0].min(), 1):
            ax.set_yscale("log")
        ax.set_xlabel(f"{LABELS[q]} error ({QUANTITIES[q]})")
        ax.set_ylabel("count")
        mae, rmse = p.scores(q)
        ax.set_title(f"MAE {mae:.3g}, RMSE {rmse:.3g}, mean {error.mean():+.3g}", fontsize=10)
    fig.suptitle(f"{p.dataset}: prediction errors")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(predictions: dict[str, Predictions], out: Path) -> list[Path]:
    paths = []
    for name, p in sorted(predictions.items()):
        if not _present(p):
            continue
        paths.append(parity_plot(p, out / f"parity_{name}.png"))
        paths.append(error_histogram(p, out / f"errors_{name}.png"))
    return paths
