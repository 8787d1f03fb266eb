"""Accuracy of a trained model on labelled frames: per-dataset MAE/RMSE next to a mean baseline.

The metrics are those of :mod:`lampretrain.objectives.metrics` (``REPORTED``): energy per atom
in meV/atom, force components in meV/Å, stress components in GPa. The mean baseline is what a model that learned nothing
beyond the training set's statistics would score; it never looks at the
evaluated labels, so a one-frame validation set gets a meaningful baseline:

    energy: predict (Σ_i ref(Z_i)) / n_g + r̄ per atom, with the element references
            ref and the mean per-atom residual r̄ of the frame's dataset in the
            store's ``stats.json`` (training frames); without a store, the
            model's own references (fitted to the same statistics) and r̄ = 0
    forces: predict 0  (MAE = mean |F_component|)
    stress: predict 0

A multi-task model evaluates each frame with the head of the frame's dataset
(or of one dataset forced by name).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ..config import ConfigError
from ..frames import Frame
from ..graph.batch import collate
from ..models import graph_cutoffs
from ..objectives.metrics import (
    Metric,
    energy_per_atom_mae,
    energy_per_atom_rmse,
    force_component_mae,
    force_component_rmse,
    stress_component_mae,
    stress_component_rmse,
)

EV_PER_A3_TO_GPA = 160.21766208
QUANTITIES = {"energy": "meV/atom", "forces": "meV/Å", "stress": "GPa"}
SCALE = {"energy": 1000.0, "forces": 1000.0, "stress": EV_PER_A3_TO_GPA}
REPORTED: dict[str, tuple[Metric, Metric]] = {  # quantity → (MAE, RMSE), the force ones as papers report them
    "energy": (energy_per_atom_mae, energy_per_atom_rmse),
    "forces": (force_component_mae, force_component_rmse),
    "stress": (stress_component_mae, stress_component_rmse),
}
SAMPLE_SHAPE = {"energy": (), "forces": (3,), "stress": (3, 3)}  # values per structure (energy, stress) or atom


@dataclass(frozen=True)
class EnergyBaseline:
    """E_base/n = Σ_i ref(Z_i)/n + r̄: the training statistics' energy per atom for a composition."""

    references: dict[int, float]  # eV per atom of Z; elements absent from training count 0
    residual_mean: float = 0.0  # mean per-atom residual of the training frames, eV/atom
    source: str = "model references"

    @classmethod
    def from_stats(cls, stats: dict, where: str) -> "EnergyBaseline":
        """From one dataset's entry of a store's ``stats.json``."""
        if "element_references" not in stats:
            raise ConfigError(f"{where}: no element_references (its training frames have no energies)")
        refs = {int(z): float(v) for z, v in stats["element_references"].items()}
        return cls(refs, float(stats.get("residual_per_atom_mean", 0.0)), where)

    def per_atom(self, numbers: np.ndarray) -> float:
        return sum(self.references.get(int(z), 0.0) for z in numbers) / len(numbers) + self.residual_mean


@dataclass
class Predictions:
    """True and predicted values of one dataset, flattened per quantity (eV, eV/Å, eV/Å³)."""

    dataset: str
    true: dict[str, list[np.ndarray]] = field(default_factory=lambda: defaultdict(list))
    pred: dict[str, list[np.ndarray]] = field(default_factory=lambda: defaultdict(list))
    natoms: list[int] = field(default_factory=list)  # atoms of each energy-labelled frame
    baseline: list[float] = field(default_factory=list)  # mean-baseline energy per atom of each labelled frame
    baseline_sources: set[str] = field(default_factory=set)
    n_frames: int = 0

    def arrays(self, quantity: str) -> tuple[np.ndarray, np.ndarray]:
        """Flat true and predicted values; energies per atom."""
        if not self.true.get(quantity):
            return np.zeros(0), np.zeros(0)
        true, pred = np.concatenate(self.true[quantity]), np.concatenate(self.pred[quantity])
        if quantity == "energy":
            return true / np.asarray(self.natoms), pred / np.asarray(self.natoms)
        return true, pred

    def plotted(self, quantity: str) -> tuple[np.ndarray, np.ndarray]:
        """What the parity plots show, in reporting units: energies as the deviation of the energy per atom from
        each frame's mean baseline (element references + mean residual). Absolute energies per atom span eV
        between compositions, so a 100 meV/atom error would sit on the diagonal; the deviation is what a
        model has to learn beyond the training statistics."""
        true, pred = self.arrays(quantity)
        if quantity == "energy":
            baseline = np.asarray(self.baseline)
            true, pred = true - baseline, pred - baseline
        return true * SCALE[quantity], pred * SCALE[quantity]

    def scores(self, quantity: str, baseline: bool = False) -> tuple[float, float]:
        """(MAE, RMSE) of ``REPORTED[quantity]`` in reporting units, of the model or of the mean baseline."""
        true = torch.from_numpy(np.concatenate(self.true[quantity]).reshape(-1, *SAMPLE_SHAPE[quantity]))
        natoms = torch.tensor(self.natoms, dtype=torch.float64)
        if not baseline:
            pred = torch.from_numpy(np.concatenate(self.pred[quantity]).reshape(true.shape))
        elif quantity == "energy":
            pred = torch.tensor(self.baseline, dtype=torch.float64) * natoms
        else:
            pred = torch.zeros_like(true)
        return tuple(float(m(pred, true, n_atoms=natoms)) * SCALE[quantity] for m in REPORTED[quantity])


def predict(
    model: torch.nn.Module,
    frames: Iterable[Frame],
    dataset: str | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    baselines: dict[str, EnergyBaseline] | None = None,
    progress: bool = False,
) -> dict[str, Predictions]:
    """Run ``model`` on labelled frames, grouped by head (``dataset`` or each frame's own).

    ``baselines``: the energy baseline of each frame's own dataset (from its store's
    statistics); a frame without one uses its head's references in the model.
    ``progress``: a progress bar over the frames (stderr).
    """
    from tqdm import tqdm

    model = model.to(device=device, dtype=dtype).eval()
    names = list(model.dataset_names)
    cutoff, three_body = graph_cutoffs(model)
    table = model.references.table.detach().cpu().double().numpy()  # (K, Zmax+1)
    baselines = baselines or {}
    groups: dict[str, list[Frame]] = defaultdict(list)
    for frame in frames:
        head = dataset or frame.dataset
        if head not in names:
            raise ValueError(
                f"frame {frame.source or '?'} belongs to dataset '{head}', which has no head in this model "
                f"(has: {', '.join(names)}); choose one with --dataset"
            )
        groups[head].append(frame)
    out: dict[str, Predictions] = {}
    bar = tqdm(total=sum(len(items) for items in groups.values()), unit="frame", desc="evaluate", disable=not progress)
    for head, items in groups.items():
        preds = out[head] = Predictions(head)
        row = table[names.index(head)]
        fallback = EnergyBaseline({z: float(row[z]) for z in np.nonzero(row)[0]}, 0.0, f"model references of '{head}'")
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            batch = collate(chunk, cutoff=cutoff, three_body_cutoff=three_body, dtype=dtype).to(device)
            periodic = any(f.cell is not None for f in chunk)
            result = model(batch, compute_forces=True, compute_stress=periodic, dataset=head)
            chosen = [baselines.get(f.dataset, fallback) for f in chunk]
            _collect(preds, chunk, {key: v.detach().cpu().double().numpy() for key, v in result.items()}, chosen)
            bar.set_postfix_str(head, refresh=False)
            bar.update(len(chunk))
    bar.close()
    return out


def _collect(
    preds: Predictions, frames: Sequence[Frame], result: dict[str, np.ndarray], baselines: Sequence[EnergyBaseline]
) -> None:
    offset = 0
    for g, (frame, baseline) in enumerate(zip(frames, baselines)):
        n = frame.natoms
        if frame.energy is not None:
            preds.true["energy"].append(np.array([frame.energy]))
            preds.pred["energy"].append(result["energy"][g : g + 1])
            preds.natoms.append(n)
            preds.baseline.append(baseline.per_atom(frame.numbers))
            preds.baseline_sources.add(baseline.source)
        if frame.forces is not None:
            preds.true["forces"].append(np.asarray(frame.forces).ravel())
            preds.pred["forces"].append(result["forces"][offset : offset + n].ravel())
        if frame.stress is not None and "stress" in result:
            preds.true["stress"].append(np.asarray(frame.stress).ravel())
            preds.pred["stress"].append(result["stress"][g].ravel())
        preds.n_frames += 1
        offset += n


def metrics_table(predictions: dict[str, Predictions]) -> list[dict[str, object]]:
    """One row per dataset and quantity: model and mean-baseline MAE/RMSE (``REPORTED``) in reporting units;
    ``mae_metric``/``rmse_metric`` name them."""
    rows = []
    for name, p in sorted(predictions.items()):
        for quantity, unit in QUANTITIES.items():
            true, _ = p.arrays(quantity)
            if true.size == 0:
                continue
            model_mae, model_rmse = p.scores(quantity)
            base_mae, base_rmse = p.scores(quantity, baseline=True)
            mae_metric, rmse_metric = REPORTED[quantity]
            rows.append({
                "dataset": name, "quantity": quantity, "unit": unit, "frames": p.n_frames, "values": int(true.size),
                "mae_metric": mae_metric.name, "rmse_metric": rmse_metric.name,
                "mae": model_mae, "rmse": model_rmse, "baseline_mae": base_mae, "baseline_rmse": base_rmse,
                # no better than predicting the training statistics: the model learned nothing here
                "mae_worse_than_baseline": model_mae >= base_mae, "rmse_worse_than_baseline": model_rmse >= base_rmse,
                "baseline": "; ".join(sorted(p.baseline_sources)) if quantity == "energy" else "zero",
            })
    return rows


WORSE = "!"  # after a model score that is no better than the mean baseline's


def format_table(rows: list[dict[str, object]]) -> str:
    header = (f"{'dataset':<16} {'quantity':<8} {'unit':<9} {'frames':>6} {'MAE':>11} {'RMSE':>11} {'base MAE':>10} "
              f"{'base RMSE':>10}")
    lines = [header, "-" * len(header)]
    for r in rows:
        mae = f"{r['mae']:.3f}{WORSE if r['mae_worse_than_baseline'] else ' '}"
        rmse = f"{r['rmse']:.3f}{WORSE if r['rmse_worse_than_baseline'] else ' '}"
        lines.append(
            f"{r['dataset']:<16} {r['quantity']:<8} {r['unit']:<9} {r['frames']:>6} {mae:>11} {rmse:>11} "
            f"{r['baseline_mae']:>10.3f} {r['baseline_rmse']:>10.3f}"
        )
    worse = sum(bool(r["mae_worse_than_baseline"]) + bool(r["rmse_worse_than_baseline"]) for r in rows)
    if worse:
        lines.append(f"{WORSE} {worse} score(s) no better than the mean baseline (base columns)")
    lines += [f"energy baseline of {r['dataset']}: {r['baseline']}" for r in rows if r["quantity"] == "energy"]
    return "\n".join(lines)


def write_csv(rows: list[dict[str, object]], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["dataset"])
        writer.writeheader()
        writer.writerows(rows)
