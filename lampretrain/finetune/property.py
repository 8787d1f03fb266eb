"""Downstream property heads: a per-structure target from a CSV, on the pooled features of a pretrained backbone.

    y_g = μ + s ⊙ MLP(pool_{i∈g} h_i)          pool: mean or sum over the atoms of structure g

h_i are the backbone's invariant node features (degree 0 for DPA4), μ and s the
per-column mean and standard deviation of the training targets, and the MLP's
last layer starts at zero, so at step 0 the head is the mean predictor (the
baseline every reported MAE is compared with). The loss is the MAE or MSE of
the standardised target over the CSV cells that are present (an empty cell is a
missing label, masked). Rows are matched to frames by the store's content hash
(``property.key: hash``, the index's ``hash`` column) or by the frame's source
``<file>#<index>`` as the reader recorded it (``key: source``).
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from ..config import ConfigError
from ..graph.batch import GraphBatch
from ..graph.datasets import GraphCollate, LmdbFrameDataset
from ..inference.loading import load_model
from ..model_files import read_model_file
from ..models import graph_cutoffs
from ..models.backbone import without_retired
from ..models.layers.mlp import MLP
from ..models.layers.scatter import scatter_sum
from ..models.multitask import MultiTaskConfig, MultiTaskModel
from ..recipe import recipe_dict
from ..store.index import StoreIndex
from ..train.schedules import lr_factor
from ..train.tracking import Tracker
from .lora import add_lora, fold_lora
from .model import freeze, lr_scales
from .recipe import FinetuneRecipe, PropertySection


def read_targets(path: str | Path, id_column: str, columns: list[str]) -> dict[str, np.ndarray]:
    """{id: (D,) float64} from a CSV with a header; an empty cell is NaN (a missing label)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such property CSV")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in [id_column, *columns] if c not in header]
        if missing:
            raise ConfigError(f"{path}: no column(s) {missing} (header: {header})")
        table: dict[str, np.ndarray] = {}
        for line, row in enumerate(reader, start=2):
            key = (row[id_column] or "").strip()
            if not key:
                raise ConfigError(f"{path}, line {line}: empty '{id_column}'")
            if key in table:
                raise ConfigError(f"{path}, line {line}: duplicate id '{key}'")
            values = []
            for c in columns:
                cell = (row[c] or "").strip()
                try:
                    values.append(float(cell) if cell else math.nan)
                except ValueError:
                    raise ConfigError(f"{path}, line {line}, column '{c}': not a number: {cell!r}") from None
            table[key] = np.array(values, dtype=np.float64)
    if not table:
        raise ConfigError(f"{path}: no rows")
    return table


@dataclass
class PropertySet:
    """The frames of one store split that have a CSV row, with their targets."""

    frames: LmdbFrameDataset
    items: np.ndarray  # (F,) positions in ``frames``
    targets: np.ndarray  # (F, D) float64, NaN where missing
    collate: GraphCollate

    def __len__(self) -> int:
        return int(self.items.size)

    def batches(self, graphs: int, order: np.ndarray | None = None) -> Iterator[tuple[GraphBatch, torch.Tensor]]:
        """(batch, targets (G, D)) of ``graphs`` structures each, in ``order`` (default: store order)."""
        order = np.arange(len(self)) if order is None else order
        for start in range(0, order.size, graphs):
            chosen = order[start : start + graphs]
            batch = self.collate([self.frames[int(self.items[k])] for k in chosen])
            yield batch, torch.from_numpy(self.targets[chosen])


def frame_keys(index: StoreIndex, frames: LmdbFrameDataset, rows: np.ndarray, key: str) -> list[str]:
    """The id of each of ``rows`` (the store rows of ``frames``): its content hash (index column) or its source
    (read from the frame)."""
    if key == "hash":
        return [h.decode("ascii") for h in index.hash[rows]]
    return [frames[k].source for k in range(len(rows))]


def property_set(
    index: StoreIndex, split: str, table: Mapping[str, np.ndarray], section: PropertySection,
    datasets: list[str] | None, max_natoms: int | None, cutoffs: tuple[float, float],
) -> PropertySet:
    """The selected ``split`` frames that have a row in ``table``, graphs at ``cutoffs`` (pair, three-body; Å:
    the backbone's)."""
    rows = index.select(split, datasets, max_natoms, required=False).rows
    frames = LmdbFrameDataset.from_rows(index, split, rows)
    keys = frame_keys(index, frames, rows, section.key)
    items = [k for k in range(len(rows)) if keys[k] in table]
    width = len(section.columns)
    targets = np.array([table[keys[k]] for k in items], dtype=np.float64).reshape(len(items), width)
    return PropertySet(frames, np.asarray(items, dtype=np.int64), targets, GraphCollate(*cutoffs))


def target_scale(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation over the present values (std 1 where it would be 0)."""
    present = ~np.isnan(targets)
    if not present.any(axis=0).all():
        raise ConfigError("property: a target column has no value on the training frames")
    mean = np.nanmean(targets, axis=0)
    std = np.nanstd(targets, axis=0)
    return mean, np.where(std > 0, std, 1.0)


def pool(features: torch.Tensor, batch: GraphBatch, mode: str) -> torch.Tensor:
    """Σ_{i∈g} h_i (sum) or that over N_g (mean), (G, C)."""
    total = scatter_sum(features, batch.batch, batch.num_graphs)
    if mode == "sum":
        return total
    return total / batch.n_atoms.to(features.dtype)[:, None]


class PropertyModel(torch.nn.Module):
    """A pretrained multi-task model plus a property head on its pooled invariant node features."""

    def __init__(self, base: MultiTaskModel, section: PropertySection, mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.base = base
        self.section = section
        self.head = MLP(base.backbone.node_channels, section.hidden, len(section.columns))
        torch.nn.init.zeros_(self.head.layers[-1].weight)
        torch.nn.init.zeros_(self.head.layers[-1].bias)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def standardised(self, batch: GraphBatch) -> torch.Tensor:
        """MLP(pool h), the prediction in units of the training std around the training mean, (G, D)."""
        scalar = self.base.backbone.node_features(batch, batch.positions, batch.cell).scalar
        return self.head(pool(scalar, batch, self.section.pooling))

    def forward(self, batch: GraphBatch) -> torch.Tensor:
        """The property in the CSV's units, (G, D)."""
        return self.mean + self.std * self.standardised(batch)

    def checkpoint(self) -> dict[str, Any]:
        return {"config": self.base.config.to_dict(), "property": asdict(self.section), "state_dict": self.state_dict()}

    def save(self, path: str | os.PathLike) -> None:
        torch.save(self.checkpoint(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "PropertyModel":
        """Rebuild from :meth:`save`'s file (read with ``weights_only=True``)."""
        ckpt = read_model_file(path, ("config", "property", "state_dict"), map_location)
        section = PropertySection(**ckpt["property"])
        width = len(section.columns)
        model = cls(MultiTaskModel(MultiTaskConfig.from_dict(ckpt["config"])), section, np.zeros(width), np.ones(width))
        model.load_state_dict(without_retired(ckpt["state_dict"], model.base.backbone, "base.backbone."))
        return model


def property_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean |Δ| (mae) or Δ² (mse) over the present entries of standardised prediction and target."""
    present = ~torch.isnan(target)
    diff = torch.where(present, pred - torch.nan_to_num(target), torch.zeros_like(pred))
    per = diff.abs() if kind == "mae" else diff.square()
    return per.sum() / present.sum().clamp(min=1)


@dataclass
class PropertyErrors:
    mae: np.ndarray  # (D,) in the CSV's units
    rmse: np.ndarray  # (D,)
    baseline_mae: np.ndarray  # (D,) of the training mean
    count: np.ndarray  # (D,) present values

    def metrics(self, prefix: str, columns: list[str]) -> dict[str, float]:
        """``{prefix}mae`` and ``{prefix}baseline_mae`` (means over the columns) and per-column MAE, RMSE, baseline."""
        out = {f"{prefix}mae": float(np.mean(self.mae)), f"{prefix}baseline_mae": float(np.mean(self.baseline_mae))}
        for k, c in enumerate(columns):
            out.update({f"{prefix}{c}_mae": float(self.mae[k]), f"{prefix}{c}_rmse": float(self.rmse[k]),
                        f"{prefix}{c}_baseline_mae": float(self.baseline_mae[k])})
        return out


def property_errors(model: PropertyModel, data: PropertySet, device: torch.device | str = "cpu") -> PropertyErrors:
    """MAE/RMSE of ``model`` and of the training-mean predictor on every frame of ``data``."""
    was_training = model.training
    model.eval()
    preds, targets = [], []
    try:
        with torch.no_grad():
            for batch, target in data.batches(model.section.graphs):
                preds.append(model(batch.to(device)).double().cpu().numpy())
                targets.append(target.numpy())
    finally:
        model.train(was_training)
    pred, target = np.concatenate(preds), np.concatenate(targets)
    present = ~np.isnan(target)
    count = present.sum(axis=0)
    err = np.where(present, pred - np.nan_to_num(target), 0.0)
    base = np.where(present, model.mean.double().cpu().numpy() - np.nan_to_num(target), 0.0)
    denom = np.maximum(count, 1)
    return PropertyErrors(np.abs(err).sum(0) / denom, np.sqrt((err**2).sum(0) / denom), np.abs(base).sum(0) / denom, count)


@dataclass
class PropertyReport:
    columns: list[str]
    train_frames: int
    eval_frames: int
    step0_mae: float  # on the evaluation split (the training-mean predictor), mean over columns
    final: dict[str, float]  # the last evaluation's metrics
    trainable: int


def _device(recipe: FinetuneRecipe) -> torch.device:
    want = recipe.train.device
    return torch.device("cuda" if (want == "cuda" or (want == "auto" and torch.cuda.is_available())) else "cpu")


def train_property(
    recipe: FinetuneRecipe, max_steps: int | None = None, on_log: Callable[[int, dict[str, float]], None] | None = None
) -> tuple[PropertyModel, PropertyReport, Tracker, int]:
    """Fit the property head (and the unfrozen backbone) for ``train.steps``; returns model, report, tracker, step.

    ``max_steps`` stops early (the schedule still follows ``train.steps``).
    Every ``train.log_every`` steps and at the end: training-window loss, and the MAE on
    ``finetune.eval_split`` (``val_mae``, ``val_<column>_mae``, with the mean-predictor baseline),
    logged to MLflow and passed to ``on_log``.
    """
    ft, sec, tr = recipe.finetune, recipe.property, recipe.train
    torch.manual_seed(tr.seed)
    index = StoreIndex.open(recipe.data.store)
    table = read_targets(sec.csv, sec.id_column, sec.columns)
    base = load_model(ft.checkpoint, "ema" if ft.use_ema else "model", verify=recipe.checkpoint.verify)
    cutoffs = graph_cutoffs(base)
    train = property_set(index, recipe.data.split, table, sec, recipe.data.datasets, recipe.data.max_natoms, cutoffs)
    if not len(train):
        example = next(iter(table))
        raise ConfigError(f"property.csv {sec.csv}: no id matches a '{recipe.data.split}' frame of {recipe.data.store} "
                         f"by {sec.key} (CSV ids look like '{example}')")
    evaluation = None
    if ft.eval_split is not None:
        evaluation = property_set(index, ft.eval_split, table, sec, recipe.data.datasets, recipe.data.max_natoms,
                                  cutoffs)
        evaluation = evaluation if len(evaluation) else None
    mean, std = target_scale(train.targets)
    if ft.lora.rank:
        add_lora(base.backbone, ft.lora.rank, ft.lora.alpha)
    freeze(base, ft.freeze, ft.freeze_blocks)
    device = _device(recipe)
    model = PropertyModel(base, sec, mean, std).to(device)
    scales = {f"base.{n}": s for n, s in lr_scales(base, ft.lr_decay).items()}
    groups: dict[float, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(scales.get(name, 1.0), []).append(p)
    o = recipe.optim
    optimizer = torch.optim.AdamW([{"params": ps, "lr_scale": s} for s, ps in groups.items()], lr=o.lr,
                                  betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    trainable = sum(p.numel() for ps in groups.values() for p in ps)
    tracker = Tracker(recipe.output, recipe.tracking.uri, recipe.tracking.experiment,
                      recipe.tracking.run_name or recipe.name, active=recipe.tracking.enabled,
                      parent_run_id=recipe.tracking.parent_run_id)
    tracker.log_recipe(recipe_dict(recipe))

    def evaluate(step: int, window: list[float]) -> dict[str, float]:
        metrics = {"loss": float(np.mean(window))} if window else {}
        metrics["train_frames"] = float(len(train))
        if evaluation is not None:
            metrics.update(property_errors(model, evaluation, device).metrics(f"{ft.eval_split}_", sec.columns))
        tracker.log_metrics(metrics, step)
        if on_log is not None:
            on_log(step, metrics)
        return metrics

    step0 = evaluate(0, [])
    rng = np.random.default_rng(tr.seed)
    order = rng.permutation(len(train))
    step, position, window, last = 0, 0, [], step0
    model.train()
    stop_at = min(tr.steps, max_steps or tr.steps)
    while step < stop_at:
        if position >= order.size:
            order, position = rng.permutation(len(train)), 0
        chosen = order[position : position + sec.graphs]
        position += sec.graphs
        batch, target = next(train.batches(sec.graphs, chosen))
        batch, target = batch.to(device), target.to(device=device, dtype=torch.float32)
        factor = lr_factor(step, tr.steps, recipe.schedule, o.lr)
        for group in optimizer.param_groups:
            group["lr"] = o.lr * factor * group["lr_scale"]
        loss = property_loss(model.standardised(batch), (target - model.mean) / model.std, sec.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tr.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for ps in groups.values() for p in ps], tr.clip_grad_norm)
        optimizer.step()
        window.append(float(loss.detach()))
        step += 1
        if step % tr.log_every == 0 or step == stop_at:
            last, window = evaluate(step, window), []
    key = f"{ft.eval_split}_mae"
    report = PropertyReport(list(sec.columns), len(train), len(evaluation) if evaluation is not None else 0,
                            step0.get(key, math.nan), last, trainable)
    return model, report, tracker, step


def export_property(model: PropertyModel, path: Path) -> Path:
    """Save a copy with LoRA adapters folded into the backbone (``PropertyModel.load`` reads it)."""
    import copy

    path.parent.mkdir(parents=True, exist_ok=True)
    plain = copy.deepcopy(model).cpu()
    fold_lora(plain.base.backbone)
    plain.save(path)
    return path


def write_summary(out: Path, report: PropertyReport, step: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune.json").write_text(json.dumps({"property": asdict(report), "step": step}, indent=1))
