"""Parity plots, error histograms and the one-page summary of an evaluation, as PNG files (matplotlib, Agg).

Energies are plotted as the deviation of the energy per atom from the mean baseline (see
:meth:`Predictions.plotted`), every quantity in reporting units (meV/atom, meV/Å, GPa).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .evaluate import QUANTITIES, SCALE, Predictions  # noqa: E402

LABELS = {"energy": "energy per atom", "forces": "force component", "stress": "stress component"}
AXIS = {"energy": "E/N − baseline", "forces": "force component", "stress": "stress component"}
HEXBIN_ABOVE = 3000  # points: beyond this a scatter is one blot, a log-density hexbin still shows where they lie
WORSE_COLOR = "tab:red"


def _num(x: float) -> str:
    """3 significant digits without an exponent for the errors of a poor model (1987, not 1.99e+03)."""
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def _present(p: Predictions) -> list[str]:
    return [q for q in QUANTITIES if p.arrays(q)[0].size]


def parity_panel(ax, p: Predictions, q: str, title: bool = True):
    """Predicted vs reference of one quantity on ``ax``: equal axes, the y = x line, a scatter or (above
    :data:`HEXBIN_ABOVE` points) a log-count hexbin, which it returns for a colour bar (else None)."""
    true, pred = p.plotted(q)
    lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
    pad = 0.05 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], color="0.5", lw=1, zorder=0)
    density = None
    if true.size > HEXBIN_ABOVE:
        density = ax.hexbin(true, pred, gridsize=60, bins="log", mincnt=1, cmap="viridis",
                            extent=(lo, hi, lo, hi), linewidths=0)
    else:
        ax.scatter(true, pred, s=14 if true.size < 300 else 5, alpha=0.6, edgecolors="none")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    for axis in (ax.xaxis, ax.yaxis):  # few ticks, plain numbers: no "+1.234e3" offset text to decode
        axis.set_major_locator(MaxNLocator(5))
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.tick_params(labelsize=8)
    unit = QUANTITIES[q]
    ax.set_xlabel(f"reference {AXIS[q]} ({unit})", fontsize=9)
    ax.set_ylabel(f"predicted ({unit})", fontsize=9)
    if title:
        mae, _ = p.scores(q)
        base, _ = p.scores(q, baseline=True)
        worse = mae >= base
        ax.set_title(f"{LABELS[q]}, {true.size} values\nMAE {mae:.3g} (baseline {base:.3g}) {unit}"
                     + (" — no better" if worse else ""), fontsize=9, color=WORSE_COLOR if worse else "black")
    return density


def parity_plot(p: Predictions, path: Path) -> Path:
    """One panel per quantity of one dataset."""
    quantities = _present(p)
    fig, axes = plt.subplots(1, len(quantities), figsize=(4.4 * len(quantities), 4.4), squeeze=False,
                             layout="constrained")
    for ax, q in zip(axes[0], quantities):
        density = parity_panel(ax, p, q)
        if density is not None:
            fig.colorbar(density, ax=ax, shrink=0.8, label="values per bin")
    fig.suptitle(f"{p.dataset}: {p.n_frames} frames (energy: deviation from the mean baseline)", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_plot(predictions: dict[str, Predictions], path: Path) -> Path:
    """One page: a row per dataset, a column per quantity, each a parity panel (an empty cell: no such labels)."""
    names = [n for n, p in sorted(predictions.items()) if _present(p)]
    quantities = [q for q in QUANTITIES if any(q in _present(predictions[n]) for n in names)]
    fig, axes = plt.subplots(len(names), len(quantities), figsize=(3.6 * len(quantities), 3.5 * len(names)),
                             squeeze=False, layout="constrained")
    for row, name in zip(axes, names):
        p = predictions[name]
        for ax, q in zip(row, quantities):
            if q not in _present(p):
                ax.axis("off")
                ax.text(0.5, 0.5, f"{name}\nno {q} labels", ha="center", va="center", fontsize=9, color="0.4",
                        transform=ax.transAxes)
                continue
            parity_panel(ax, p, q, title=False)
            mae, _ = p.scores(q)
            base, _ = p.scores(q, baseline=True)
            worse = mae >= base
            ax.set_title(f"{name} · {q}\nMAE {_num(mae)} / baseline {_num(base)}" + (" !" if worse else ""),
                         fontsize=9, color=WORSE_COLOR if worse else "black")
    fig.suptitle(f"parity per dataset and quantity; energy: deviation from the mean baseline\nhexbin colour: log "
                 f"count (above {HEXBIN_ABOVE} values); red: no better than the baseline", fontsize=10)
    fig.savefig(path, dpi=100)
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
        ax.xaxis.set_major_locator(MaxNLocator(6))
        ax.set_xlabel(f"{LABELS[q]} error ({QUANTITIES[q]})")
        ax.set_ylabel("count")
        mae, rmse = p.scores(q)
        ax.set_title(f"MAE {_num(mae)}, RMSE {_num(rmse)}, mean {error.mean():+.3g}", fontsize=10)
    fig.suptitle(f"{p.dataset}: prediction errors")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(predictions: dict[str, Predictions], out: Path) -> list[Path]:
    """``summary.png`` (all datasets on one page), then ``parity_<dataset>.png`` and ``errors_<dataset>.png``."""
    present = {name: p for name, p in predictions.items() if _present(p)}
    paths = [summary_plot(present, out / "summary.png")] if present else []
    for name, p in sorted(present.items()):
        paths.append(parity_plot(p, out / f"parity_{name}.png"))
        paths.append(error_histogram(p, out / f"errors_{name}.png"))
    return paths
