"""Validation on the store's val split: per-dataset error metrics, all ranks together.

The metrics (:mod:`lampretrain.objectives.metrics`, eV units) are ``VAL_METRICS``: the per-atom
energy MAE, the per-component force MAE (what papers report), the force norm MAE (the force loss,
so it compares with the training log's ``<dataset>/force_norm_mae``) and the per-component stress MAE.

Each rank evaluates its share of the split (:func:`.data.build_val_loader`);
the summed per-sample errors and labelled-sample counts per (dataset, metric) stay on
the device, and one all-reduce at the end turns them into metrics over the whole
split. With EMA on, the averaged weights are evaluated. The model runs in eval mode,
so the force derivative is taken without ``create_graph`` and only with respect to
positions and strain; no parameter gets a gradient.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Mapping

import torch
import torch.distributed as dist

from ..graph.batch import GraphBatch
from ..objectives.metrics import energy_per_atom_mae, force_component_mae, force_norm_mae, stress_component_mae
from .ema import EMA
from .engines import Engine

VAL_METRICS = (energy_per_atom_mae, force_component_mae, force_norm_mae, stress_component_mae)


def error_sums(out: Mapping[str, torch.Tensor], batch: GraphBatch, k: int) -> torch.Tensor:
    """(K, M, 2) float64: per dataset and metric of ``VAL_METRICS``, Σ per-sample error and labelled samples."""
    atom_ds = batch.dataset[batch.batch]
    sums = []
    for metric in VAL_METRICS:
        label = metric.label
        per_atom = label == "forces"
        sums.append(metric.sums(
            out[label].detach().double(), getattr(batch, label).double(), getattr(batch, f"{label}_mask"),
            atom_ds if per_atom else batch.dataset, k, batch.n_atoms,
        ))
    return torch.stack(sums, dim=1)


def metrics(sums: torch.Tensor, names: list[str]) -> dict[str, float]:
    """``val/<dataset>/<metric>`` for every labelled (dataset, metric), and ``val/<metric>`` over all datasets."""
    per_dataset = torch.stack([m.finish(sums[:, i]) for i, m in enumerate(VAL_METRICS)], dim=1).tolist()  # (K, M)
    overall = [m.finish(sums[:, i].sum(dim=0)).item() for i, m in enumerate(VAL_METRICS)]
    counts = sums[..., 1].tolist()  # (K, M)
    out = {}
    for i, metric in enumerate(VAL_METRICS):
        for d, name in enumerate(names):
            if counts[d][i] > 0:
                out[f"val/{name}/{metric.name}"] = per_dataset[d][i]
        if sum(row[i] for row in counts) > 0:
            out[f"val/{metric.name}"] = overall[i]
    return out


def validate(
    engine: Engine, batches: Iterable[GraphBatch], names: list[str], ema: EMA | None, device: torch.device
) -> dict[str, float]:
    """Every rank calls this with its share of the val batches; all get the metrics over the whole split."""
    sums = torch.zeros(len(names), len(VAL_METRICS), 2, dtype=torch.float64, device=device)
    with ema.applied() if ema is not None else contextlib.nullcontext(), engine.evaluation() as model:
        for batch in batches:
            batch = batch.to(device, non_blocking=True)
            with torch.enable_grad():  # forces and stress are derivatives, even in evaluation
                out = model(batch, compute_forces=True, compute_stress=True)
            sums += error_sums(out, batch, len(names))
    dist.all_reduce(sums)
    return metrics(sums.cpu(), names)
