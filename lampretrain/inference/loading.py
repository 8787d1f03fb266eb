"""Trained models back from disk: a trainer checkpoint directory or a :meth:`MultiTaskModel.save` file.

A trainer checkpoint (``<run>/checkpoints/step-N/``, torch.distributed.checkpoint
shards) holds tensors only; the model is rebuilt from the resolved recipe in its
``meta.json`` and the dataset list (head order), then the weights are read with
the trainer's safe reader (tensor-only planner, restricted metadata unpickler).
The exponential moving average of the weights is used when the run kept one,
as is usual for evaluation and as fine-tuning starts from and exports. Nothing here unpickles arbitrary objects: see
:mod:`lampretrain.train.checkpoint` for what a planted checkpoint is refused
with; a model file is read by :mod:`lampretrain.model_files`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..models import options_saved_before
from ..models.foreign import MODEL_FILE
from ..models.multitask import DatasetSpec, HeadsConfig, MultiTaskConfig, MultiTaskModel
from ..store.index import StoreIndex
from ..train import checkpoint as ckpt

WEIGHTS = ("ema", "model")


def resolve_checkpoint(path: str | Path) -> Path:
    """A model file, checkpoint directory, a run's ``checkpoints`` folder, a run directory, or a directory
    ``lampretrain import`` wrote → what to load."""
    imported = Path(path) / MODEL_FILE
    if imported.is_file():
        return imported
    return ckpt.resolve(path, hashes=False)


def _datasets(meta: dict[str, Any], where: Path) -> tuple[list[str], dict[str, Any]]:
    """Head order of the run (``data.datasets`` of its recipe, else all datasets of its store) and the store's
    ``stats.json`` ({} when the store is gone)."""
    data = meta["recipe"]["data"]
    try:
        index = StoreIndex.open(data["store"])
    except FileNotFoundError as err:
        if data.get("datasets"):
            return list(data["datasets"]), {}
        raise ckpt.CheckpointError(
            f"{where}: the checkpoint names no dataset list and its store {data['store']} is gone ({err}); "
            "the head order cannot be known"
        ) from None
    return list(data.get("datasets") or index.datasets), index.stats()


def model_config_from_meta(meta: dict[str, Any], where: Path) -> MultiTaskConfig:
    """The model's config: saved by the trainer under ``model``, or (older checkpoints) rebuilt from the
    resolved recipe as the trainer built it. References and head scales are then overwritten by the
    checkpoint's tensors; the store's statistics, when it is still there, give the loss normalisation a
    fine-tuning run reads from the config."""
    if "model" in meta:
        return MultiTaskConfig.from_dict(meta["model"])
    model = meta["recipe"]["model"]
    names, stats = _datasets(meta, where)
    return MultiTaskConfig(
        backbone=model["name"],
        datasets=[DatasetSpec.from_stats(n, stats.get(n, {})) for n in names],
        heads=HeadsConfig.from_dict(model.get("heads") or {}),
        # a recipe-only checkpoint predates saved model configs: it was built with the defaults of then
        backbone_options={**options_saved_before(model["name"]), **(model.get("options") or {})},
    )


def read_weights(path: Path, model: torch.nn.Module, ema: bool = True) -> None:
    """Fill ``model`` in place from trainer checkpoint ``path``: its weights, and with ``ema`` the moving
    average of every parameter the run averaged (those it trained; the checkpoint holds them whole whatever
    the engine sharded). ``model`` must be built as the run's was (config, adapters)."""
    state = model.state_dict()
    tensors: dict[str, Any] = {"model": state}
    if ema:
        saved = ckpt.read_metadata(path).state_dict_metadata
        tensors["ema"] = {n: p.detach().clone() for n, p in model.named_parameters() if f"ema.{n}" in saved}
    ckpt.load(path, tensors)
    state.update(tensors.get("ema", {}))
    model.load_state_dict(state)


def load_model(path: str | Path, weights: str = "ema", verify: bool = True) -> MultiTaskModel:
    """Rebuild a trained :class:`MultiTaskModel` on CPU in eval mode; inference and fine-tuning start here.

    ``weights``: "ema" (the moving average when the checkpoint has one, else the
    raw weights) or "model" (always the raw weights). ``verify``: check the
    checkpoint's files against their SHA-256 (sizes and the marker are always checked).
    """
    if weights not in WEIGHTS:
        raise ConfigError(f"weights '{weights}' not one of {', '.join(WEIGHTS)}")
    path = resolve_checkpoint(path)
    if path.is_file():
        return MultiTaskModel.load(path).eval()
    ckpt.verify(path, hashes=verify)
    model = MultiTaskModel(model_config_from_meta(ckpt.read_meta(path), path))
    read_weights(path, model, ema=weights == "ema")
    return model.eval()
