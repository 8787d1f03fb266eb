"""Fine-tuning on the pretraining loop: the trainer runs unchanged, :class:`FinetuneHooks` supply model and data.

Before step 0: load the checkpoint (heads and references kept), add a head
copied from a named one if asked, refit the trained head's element references
on the new data (change-bias), attach LoRA adapters, freeze. The stream mixes
the new data with replayed pretraining data (each on its own pretrained head)
at ``replay.ratio`` of the micro-batches. At the end the final checkpoint's model
(EMA weights when the run keeps them, adapters folded into the weights) is
exported as ``<output>/model.pt`` for ``MultiTaskModel.load``.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..config import ConfigError
from ..graph.batch import GraphBatch
from ..inference.loading import load_model, model_config_from_meta, read_weights, resolve_checkpoint
from ..models import graph_cutoffs
from ..models.multitask import DatasetSpec, MultiTaskModel
from ..store.index import StoreIndex
from ..train import checkpoint as ckpt
from ..train.data import TrainData, build_train_data
from ..train.references import change_bias, energy_errors, store_batches
from ..train.trainer import RunResult, TrainHooks, pretrain
from .lora import add_lora, fold_lora
from .model import freeze, lr_scales, with_new_head
from .property import PropertyHooks, PropertyModel, PropertyReport, write_summary
from .recipe import FinetuneRecipe


class MixedData:
    """The new data's stream with replay micro-batches interleaved, dataset ids mapped to the model's heads.

    After the t-th new micro-batch (t counted over epochs) come replay batches until
    ⌊(t+1)·ρ⌋ have been drawn, ρ = ratio / (1 − ratio); (epoch, position) are the new
    data's, so resume is exact for it and restarts replay at the matching count.
    """

    def __init__(self, main: TrainData, main_heads: torch.Tensor, replay: TrainData | None, replay_heads, ratio: float):
        self.main, self.replay = main, replay
        self.main_heads, self.replay_heads = main_heads, replay_heads
        self.rho = ratio / (1.0 - ratio)
        self.sampler = main.sampler
        self.datasets = main.datasets

    def use_cutoffs(self, cutoff: float, three_body_cutoff: float) -> None:
        """Build both streams' graphs at these cutoffs (the model's): :meth:`TrainData.use_cutoffs`."""
        for data in (self.main, self.replay):
            if data is not None:
                data.use_cutoffs(cutoff, three_body_cutoff)

    def finish(self, batch: GraphBatch, device: torch.device) -> GraphBatch:
        """:meth:`TrainData.finish` (main and replay share the recipe's ``data.graphs_on`` and cutoffs)."""
        return self.main.finish(batch, device)

    def stream(self, epoch: int, position: int) -> Iterator[tuple[int, int, GraphBatch]]:
        per_epoch = max(len(self.main.sampler), 1)
        t = epoch * per_epoch + position
        drawn = math.floor(t * self.rho)
        replay = None
        if self.replay is not None and self.rho > 0:
            length = max(len(self.replay.sampler), 1)
            replay = self.replay.stream(drawn // length, drawn % length)
        for epoch, position, batch in self.main.stream(epoch, position):
            yield epoch, position, replace(batch, dataset=self.main_heads[batch.dataset])
            t += 1
            while replay is not None and drawn < math.floor(t * self.rho):
                _, _, extra = next(replay)
                drawn += 1
                yield epoch, position, replace(extra, dataset=self.replay_heads[extra.dataset])


@dataclass
class FinetuneReport:
    head: str
    reference_shift: dict[int, float]  # change-bias δ per element, eV
    step0_mae_pretrained: float  # eV/atom on the new training data, head as loaded (or copied)
    step0_mae: float  # the same after change-bias
    frozen: int  # frozen parameter tensors
    trainable: int  # trainable parameter count


class FinetuneHooks(TrainHooks):
    def __init__(self, recipe: FinetuneRecipe, on_log: Callable[[int, dict[str, float]], None] | None = None):
        ft = recipe.finetune
        self.recipe, self._on_log = recipe, on_log
        index = StoreIndex.open(recipe.data.store)
        names = index.select(recipe.data.split, recipe.data.datasets, recipe.data.max_natoms).names
        if len(names) != 1:
            raise ConfigError(f"data: fine-tuning trains one head on one dataset; {recipe.data.store} gives {names} "
                             "(pick one with data.datasets)")
        self.data_name = names[0]
        self.head = ft.head or self.data_name
        model = load_model(ft.checkpoint, "ema" if ft.use_ema else "model", verify=recipe.checkpoint.verify)
        if ft.init_from is not None:
            spec = DatasetSpec.from_stats(self.head, index.stats().get(self.data_name, {}))
            model = with_new_head(model, spec, ft.init_from)
        else:
            model.dataset_index(self.head)  # names the heads when it is not one of them
        batches = lambda: store_batches(  # noqa: E731
            recipe.data.store, {self.data_name: 0}, "train", recipe.data.max_natoms, cutoffs=graph_cutoffs(model)
        )
        before = energy_errors(model, (model.for_dataset(b, self.head) for b in batches())).energy_per_atom_mae
        delta = change_bias(model, self.head, batches()) if ft.refit_references else {}
        after = energy_errors(model, (model.for_dataset(b, self.head) for b in batches())).energy_per_atom_mae
        if ft.lora.rank:
            add_lora(model.backbone, ft.lora.rank, ft.lora.alpha)
        frozen = freeze(model, ft.freeze, ft.freeze_blocks)
        self.model = model
        self.eval_split = ft.eval_split if ft.eval_split and self._has_rows(index, ft.eval_split) else None
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.report = FinetuneReport(self.head, delta, before, after, len(frozen), trainable)

    def build_data(self, recipe: FinetuneRecipe, rank: int, world_size: int) -> MixedData:
        ft = recipe.finetune
        main = build_train_data(recipe.data, rank, world_size, recipe.train.seed)
        main_heads = torch.tensor([self.model.dataset_index(self.head)])
        replay, replay_heads = None, None
        if ft.replay.ratio > 0:
            index = StoreIndex.open(ft.replay.store)
            wanted = ft.replay.datasets or [n for n in index.datasets if n in self.model.dataset_names]
            names = index.select("train", wanted, recipe.data.max_natoms, key="finetune.replay").names
            if self.head in names:
                raise ConfigError(f"finetune.replay: dataset '{self.head}' is the fine-tuned head; replay other datasets")
            section = copy.deepcopy(recipe.data)
            section.store, section.datasets, section.split = ft.replay.store, names, "train"
            section.budget = ft.replay.budget or recipe.data.budget
            section.sampling = copy.deepcopy(recipe.data.sampling)
            section.sampling.strategy = "proportional" if section.sampling.strategy == "explicit" else section.sampling.strategy
            replay = build_train_data(section, rank, world_size, recipe.train.seed + 1)
            replay_heads = torch.tensor([self.model.dataset_index(n) for n in replay.datasets])
        return MixedData(main, main_heads, replay, replay_heads, ft.replay.ratio)

    def build_model(self, recipe: FinetuneRecipe, data: MixedData) -> MultiTaskModel:
        return self.model

    def lr_scales(self, model: MultiTaskModel) -> dict[str, float]:
        return lr_scales(model, self.recipe.finetune.lr_decay)

    def _has_rows(self, index: StoreIndex, split: str) -> bool:
        return len(index.select(split, [self.data_name], self.recipe.data.max_natoms, required=False)) > 0

    def evaluate(self) -> dict[str, float]:
        """Energy MAE per atom (eV/atom) of the fine-tuned head on ``finetune.eval_split``: ``<split>_mae``."""
        if self.eval_split is None:
            return {}
        data = self.recipe.data
        batches = store_batches(
            data.store, {self.data_name: 0}, self.eval_split, data.max_natoms, cutoffs=graph_cutoffs(self.model)
        )
        mae = energy_errors(self.model, (self.model.for_dataset(b, self.head) for b in batches)).energy_per_atom_mae
        return {f"{self.eval_split}_mae": mae}

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        extra = self.evaluate()
        if extra and self.recipe.tracking.enabled:
            import mlflow

            if mlflow.active_run() is not None:  # the trainer's run (rank 0)
                mlflow.log_metrics(extra, step=step)
        if self._on_log is not None:
            self._on_log(step, {**metrics, **extra})


@dataclass
class FinetuneResult:
    run: RunResult
    report: FinetuneReport | PropertyReport
    exported: Path | None  # <output>/model.pt, or <output>/property.pt for a property head (rank 0)


def exported_model(recipe: FinetuneRecipe, run: RunResult) -> MultiTaskModel | PropertyModel:
    """The model of the run's final checkpoint with LoRA adapters folded into the weights (what
    ``MultiTaskModel.load``, or ``PropertyModel.load`` for a property head, reads back once saved): its EMA
    weights when the run kept an average, whole whatever the engine sharded (the live module after training
    holds the raw weights, under FSDP2/ZeRO-3 a shard). Every rank calls it: under a process group that outlives
    the run (the caller's) reading a checkpoint is collective."""
    # a resumed run that had already finished trains no step and writes no checkpoint: its newest is the result
    checkpoint = run.checkpoint or resolve_checkpoint(run.run_dir)
    model = MultiTaskModel(model_config_from_meta(ckpt.read_meta(checkpoint), checkpoint))
    lora = recipe.finetune.lora
    if lora.rank:
        add_lora(model.backbone, lora.rank, lora.alpha)  # the trained module's shape, so its tensors load by name
    if recipe.property.csv:  # target mean and std are buffers of the checkpoint
        width = len(recipe.property.columns)
        model = PropertyModel(model, recipe.property, np.zeros(width), np.ones(width))
    read_weights(checkpoint, model, ema=True)
    fold_lora(model.backbone)
    return model


def finetune(
    recipe: FinetuneRecipe, resume: str | None = None, max_steps: int | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
) -> FinetuneResult:
    """Fine-tune energies/forces, or a property head when ``property.csv`` is set, on the pretraining loop.

    ``on_log(step, metrics)`` sees every logged window with the ``<eval_split>_mae`` evaluation (rank 0);
    a property run also reports step 0 (the training-mean predictor).
    """
    if recipe.property.csv:
        return _finetune_property(recipe, resume, max_steps, on_log)
    hooks = FinetuneHooks(recipe, on_log)
    run = pretrain(recipe, resume=resume, max_steps=max_steps, hooks=hooks)
    model, exported = exported_model(recipe, run), None
    if int(os.environ.get("RANK", "0")) == 0:
        out = Path(recipe.output)
        exported = out / "model.pt"
        model.save(exported)
        (out / "finetune.json").write_text(json.dumps({
            "head": hooks.report.head, "reference_shift": hooks.report.reference_shift,
            "step0_mae_pretrained": hooks.report.step0_mae_pretrained, "step0_mae": hooks.report.step0_mae,
            "step": run.step, "checkpoint": str(run.checkpoint), "last_metrics": run.last_metrics,
        }, indent=1))
    return FinetuneResult(run, hooks.report, exported)


def _finetune_property(recipe: FinetuneRecipe, resume: str | None, max_steps: int | None, on_log) -> FinetuneResult:
    if recipe.train.eval_every is None and recipe.finetune.eval_split is not None:
        # the eval-split MAE at every log window, as the step-0 one and as sweeps rank trials by it
        recipe = replace(recipe, train=replace(recipe.train, eval_every=recipe.train.log_every))
    hooks = PropertyHooks(recipe, on_log)
    run = pretrain(recipe, resume=resume, max_steps=max_steps, hooks=hooks)
    report = hooks.report({**run.last_metrics, **run.val_metrics})
    model, exported = exported_model(recipe, run), None
    if int(os.environ.get("RANK", "0")) == 0:
        out = Path(recipe.output)
        exported = out / "property.pt"
        model.save(exported)
        write_summary(out, report, run.step)
    return FinetuneResult(run, report, exported)
