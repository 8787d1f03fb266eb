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

It trains on the pretraining loop (:func:`lampretrain.train.pretrain` with :class:`PropertyHooks`), so engines,
EMA, checkpoints, resume and several ranks work as for any run; the targets ride in the batches
(:class:`PropertyBatch`), and ``finetune/run.py`` exports the final checkpoint's EMA model.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from ..config import ConfigError
from ..frames import Frame
from ..graph.batch import GraphBatch
from ..graph.datasets import GraphCollate, LmdbFrameDataset
from ..inference.loading import load_model
from ..model_files import read_model_file
from ..models import graph_cutoffs
from ..models.backbone import without_retired
from ..models.layers.mlp import MLP
from ..models.layers.scatter import scatter_sum
from ..models.multitask import MultiTaskConfig, MultiTaskModel
from ..sampling import BalancedBatchSampler
from ..store.index import StoreIndex
from ..train.data import TrainData, WorkerLoader, stream_data
from ..train.ema import EMA
from ..train.engines import Engine
from ..train.trainer import TrainHooks
from .lora import add_lora
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
class PropertySet(Dataset):
    """The frames of one store split that have a CSV row: item k is (frame, its targets)."""

    frames: LmdbFrameDataset
    items: np.ndarray  # (F,) positions in ``frames``
    targets: np.ndarray  # (F, D) float64, NaN where missing

    def __len__(self) -> int:
        return int(self.items.size)

    def __getitem__(self, k: int) -> tuple[Frame, np.ndarray]:
        return self.frames[int(self.items[k])], self.targets[k]

    def share(self, rank: int, world_size: int) -> "PropertySet":
        """Every ``world_size``-th structure from ``rank`` on: across ranks, each structure once."""
        return PropertySet(self.frames, self.items[rank::world_size], self.targets[rank::world_size])


def property_set(
    index: StoreIndex, split: str, table: Mapping[str, np.ndarray], section: PropertySection,
    datasets: list[str] | None, max_natoms: int | None,
) -> PropertySet:
    """The selected ``split`` frames that have a row in ``table``, by content hash (index column) or source (read
    from the frame)."""
    rows = index.select(split, datasets, max_natoms, required=False).rows
    frames = LmdbFrameDataset.from_rows(index, split, rows)
    if section.key == "hash":
        keys = [h.decode("ascii") for h in index.hash[rows]]
    else:
        keys = [frames[k].source for k in range(len(rows))]
    items = [k for k in range(len(rows)) if keys[k] in table]
    width = len(section.columns)
    targets = np.array([table[keys[k]] for k in items], dtype=np.float64).reshape(len(items), width)
    return PropertySet(frames, np.asarray(items, dtype=np.int64), targets)


@dataclass
class PropertyBatch(GraphBatch):
    """A graph batch with the structures' targets: the trainer, engines and loaders pass it on as a GraphBatch."""

    target: torch.Tensor  # (G, D) float64 in the CSV's units, NaN where missing


class PropertyCollate(GraphCollate):
    """``collate_fn`` for :class:`PropertySet` items: their frames' graph batch with the targets."""

    def batch(self, items: Sequence[tuple[Frame, np.ndarray]]) -> PropertyBatch:
        graphs = super().batch([frame for frame, _ in items])
        return PropertyBatch(**vars(graphs), target=torch.from_numpy(np.stack([t for _, t in items])))


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

    @property
    def backbone(self) -> torch.nn.Module:
        """The base's backbone: its cutoffs build the graphs (``models.graph_cutoffs``), LoRA folds into it."""
        return self.base.backbone

    @property
    def config(self) -> MultiTaskConfig:
        """The base's config, what trainer checkpoints record to rebuild the model (the head is the recipe's
        ``property`` section)."""
        return self.base.config

    def standardised(self, batch: GraphBatch) -> torch.Tensor:
        """MLP(pool h), the prediction in units of the training std around the training mean, (G, D)."""
        scalar = self.base.backbone.node_features(batch, batch.positions, batch.cell).scalar
        return self.head(pool(scalar, batch, self.section.pooling))

    def forward(self, batch: GraphBatch) -> dict[str, torch.Tensor]:
        """``property``: (G, D) in the CSV's units."""
        return {"property": self.mean + self.std * self.standardised(batch)}

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


class PropertyObjective(torch.nn.Module):
    """The trainer's objective for a property head: mean |Δ/s| (mae) or (Δ/s)² (mse) over the present targets,
    Δ = prediction − target and s the training std, i.e. the loss of the standardised target."""

    def __init__(self, std: np.ndarray, kind: str):
        super().__init__()
        self.kind = kind
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32), persistent=False)  # from the CSV

    def follow_lr(self, lr_fraction: float) -> None:
        """One loss term: no weight anneals with the learning rate."""

    def forward(self, out: Mapping[str, torch.Tensor], batch: PropertyBatch) -> tuple[torch.Tensor, dict]:
        target = batch.target.float()
        present = ~torch.isnan(target)
        diff = torch.where(present, (out["property"].float() - torch.nan_to_num(target)) / self.std, 0.0)
        per = diff.abs() if self.kind == "mae" else diff.square()
        loss = per.sum() / present.sum().clamp(min=1)
        return loss, {"loss": loss.detach()}


def property_metrics(sums: torch.Tensor, prefix: str, columns: list[str]) -> dict[str, float]:
    """From :func:`error_sums` added up over batches and ranks: ``{prefix}mae`` and ``{prefix}baseline_mae`` (of the
    training mean; means over the columns) and per column ``{prefix}<column>_mae``, ``_rmse``, ``_baseline_mae``,
    in the CSV's units."""
    absolute, square, baseline = (sums[:3] / sums[3].clamp(min=1)).cpu().numpy()
    out = {f"{prefix}mae": float(np.mean(absolute)), f"{prefix}baseline_mae": float(np.mean(baseline))}
    for k, c in enumerate(columns):
        out.update({f"{prefix}{c}_mae": float(absolute[k]), f"{prefix}{c}_rmse": float(np.sqrt(square[k])),
                    f"{prefix}{c}_baseline_mae": float(baseline[k])})
    return out


def error_sums(model: PropertyModel, batch: PropertyBatch) -> torch.Tensor:
    """(4, D) float64: Σ |Δ|, Σ Δ², Σ |training mean − target| and the count over the present targets of ``batch``
    (``model`` in eval mode)."""
    with torch.no_grad():
        pred = model(batch)["property"].double()
    target = batch.target.double()
    present = ~torch.isnan(target)
    target = torch.nan_to_num(target)
    err = torch.where(present, pred - target, 0.0)
    base = torch.where(present, model.mean.double() - target, 0.0)
    return torch.stack([err.abs().sum(0), err.square().sum(0), base.abs().sum(0), present.sum(0).double()])


@dataclass
class PropertyReport:
    columns: list[str]
    train_frames: int
    eval_frames: int
    step0_mae: float  # on the evaluation split (the training-mean predictor), mean over columns
    final: dict[str, float]  # the last evaluation's metrics
    trainable: int


class PropertyHooks(TrainHooks):
    """A property head on the trainer: data, model, objective and validation of ``recipe.property``.

    The stream draws ``property.graphs`` structures per rank and micro-batch (each costs 1 in the
    sampler, the budget is ``graphs``), in the sampler's resumable order. Validation (EMA weights, all
    ranks) gives the MAE on ``finetune.eval_split`` in the CSV's units, ``<split>_mae`` and per column,
    next to the training-mean predictor's, also before the first step (the step-0 MAE).
    """

    validate_at_start = True

    def __init__(self, recipe: FinetuneRecipe, on_log: Callable[[int, dict[str, float]], None] | None = None):
        ft, sec, data = recipe.finetune, recipe.property, recipe.data
        self.recipe, self._on_log = recipe, on_log
        self.index = StoreIndex.open(data.store)
        table = read_targets(sec.csv, sec.id_column, sec.columns)
        self.train = property_set(self.index, data.split, table, sec, data.datasets, data.max_natoms)
        if not len(self.train):
            raise ConfigError(f"property.csv {sec.csv}: no id matches a '{data.split}' frame of {data.store} "
                             f"by {sec.key} (CSV ids look like '{next(iter(table))}')")
        self.evaluation = None
        if ft.eval_split is not None:
            evaluation = property_set(self.index, ft.eval_split, table, sec, data.datasets, data.max_natoms)
            self.evaluation = evaluation if len(evaluation) else None
        self.mean, self.std = target_scale(self.train.targets)
        self.prefix = f"{ft.eval_split}_"
        self.model: PropertyModel | None = None
        self.step0_file = Path(recipe.output) / "property-step0.json"

    def build_data(self, recipe: FinetuneRecipe, rank: int, world_size: int) -> TrainData:
        sampler = BalancedBatchSampler(np.ones(len(self.train)), recipe.property.graphs, rank, world_size,
                                       seed=recipe.train.seed)
        collate = PropertyCollate(self.index.cutoff, self.index.three_body_cutoff,
                                  on_device=recipe.data.graphs_on == "device", packed=True)
        return stream_data(self.index, [], self.train, sampler, collate, recipe.data.workers, recipe.train.seed)

    def build_model(self, recipe: FinetuneRecipe, data: TrainData) -> PropertyModel:
        """The checkpoint's model (EMA weights if asked) with adapters and freezing, the energy heads frozen (a
        property does not reach them), and a new head whose zero last layer predicts the training mean."""
        ft = recipe.finetune
        base = load_model(ft.checkpoint, "ema" if ft.use_ema else "model", verify=recipe.checkpoint.verify)
        if ft.lora.rank:
            add_lora(base.backbone, ft.lora.rank, ft.lora.alpha)
        freeze(base, ft.freeze, ft.freeze_blocks)
        in_backbone = {id(p) for p in base.backbone.parameters()}
        for p in base.parameters():
            if id(p) not in in_backbone:
                p.requires_grad_(False)
        self.model = PropertyModel(base, recipe.property, self.mean, self.std)
        return self.model

    def build_objective(self, recipe: FinetuneRecipe, model: PropertyModel) -> PropertyObjective:
        return PropertyObjective(self.std, recipe.property.loss)

    def build_val_loader(self, recipe: FinetuneRecipe, model: PropertyModel, rank: int, world_size: int):
        """This rank's share of the ``finetune.eval_split`` structures, ``property.graphs`` per batch."""
        if self.evaluation is None:
            return None
        mine = self.evaluation.share(rank, world_size)
        graphs = recipe.property.graphs
        batches = [list(range(k, min(k + graphs, len(mine)))) for k in range(0, len(mine), graphs)]
        return WorkerLoader(mine, batch_sampler=batches, collate_fn=PropertyCollate(*graph_cutoffs(model)),
                            num_workers=recipe.data.workers, generator=torch.Generator().manual_seed(0))

    def validate(self, engine: Engine, batches, model: PropertyModel, ema: EMA | None,
                 device: torch.device) -> dict[str, float]:
        sums = torch.zeros(4, len(self.recipe.property.columns), dtype=torch.float64, device=device)
        with ema.applied() if ema is not None else contextlib.nullcontext(), engine.evaluation() as module:
            for batch in batches:
                sums += error_sums(module, batch.to(device))
        dist.all_reduce(sums)
        return property_metrics(sums, self.prefix, self.recipe.property.columns)

    def lr_scales(self, model: PropertyModel) -> dict[str, float]:
        return {f"base.{n}": s for n, s in lr_scales(model.base, self.recipe.finetune.lr_decay).items()}

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if step == 0:  # the validation before the first step, kept for the report of this run and of its resumptions
            self.step0_file.write_text(json.dumps(metrics))
        if self._on_log is not None:
            self._on_log(step, metrics)

    def report(self, final: dict[str, float]) -> PropertyReport:
        """The run's summary (on rank 0, which keeps the step-0 validation)."""
        step0 = json.loads(self.step0_file.read_text()) if self.step0_file.exists() else {}
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return PropertyReport(list(self.recipe.property.columns), len(self.train),
                              len(self.evaluation) if self.evaluation is not None else 0,
                              step0.get(f"{self.prefix}mae", math.nan), final, trainable)


def write_summary(out: Path, report: PropertyReport, step: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune.json").write_text(json.dumps({"property": asdict(report), "step": step}, indent=1))
