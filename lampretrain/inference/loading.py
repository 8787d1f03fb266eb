"""Trained models back from disk: a trainer checkpoint directory or a :meth:`MultiTaskModel.save` file.

A trainer checkpoint (``<run>/checkpoints/step-N/``, torch.distributed.checkpoint
shards) holds tensors only; the model is rebuilt from the resolved recipe in its
``meta.json`` and the dataset list (head order), then the weights are read with
the trainer's safe reader (tensor-only planner, restricted metadata unpickler).
The exponential moving average of the weights is used when the run kept one,
as is usual for evaluation. Nothing here unpickles arbitrary objects: see
:mod:`lampretrain.train.checkpoint` for what a planted checkpoint is refused
with; a model file is read by :mod:`lampretrain.model_files`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..models.multitask import DatasetSpec, HeadsConfig, MultiTaskConfig, MultiTaskModel
from ..store.index import StoreIndex
from ..train import checkpoint as ckpt

WEIGHTS = ("ema", "model")


def resolve_checkpoint(path: str | Path) -> Path:
    """A model file, checkpoint directory, a run's ``checkpoints`` folder or a run directory → what to load."""
    return ckpt.resolve(path, hashes=False)


def _dataset_names(meta: dict[str, Any], where: Path) -> list[str]:
    """Head order of the run: ``data.datasets`` of its recipe, or all datasets of its store."""
    data = meta["recipe"]["data"]
    if data.get("datasets"):
        return list(data["datasets"])
    try:
        return StoreIndex.open(data["store"]).datasets
    except FileNotFoundError as err:
        raise ckpt.CheckpointError(
            f"{where}: the checkpoint names no dataset list and its store {data['store']} is gone ({err}); "
            "the head order cannot be known"
        ) from None


def model_config_from_meta(meta: dict[str, Any], where: Path) -> MultiTaskConfig:
    """The model's config: saved by the trainer under ``model`` or rebuilt from the resolved recipe."""
    if "model" in meta:
        return MultiTaskConfig.from_dict(meta["model"])
    model = meta["recipe"]["model"]
    # references and scales are overwritten by the checkpoint's tensors; only names and shapes matter here
    specs = [DatasetSpec(name=n) for n in _dataset_names(meta, where)]
    return MultiTaskConfig(
        backbone=model["name"],
        datasets=specs,
        heads=HeadsConfig.from_dict(model.get("heads") or {}),
        backbone_options=dict(model.get("options") or {}),
    )


def load_model(path: str | Path, weights: str = "ema") -> MultiTaskModel:
    """Rebuild a trained :class:`MultiTaskModel` on CPU in eval mode.

    ``weights``: "ema" (the moving average when the checkpoint has one, else the
    raw weights) or "model" (always the raw weights).
    """
    if weights not in WEIGHTS:
        raise ConfigError(f"weights '{weights}' not one of {', '.join(WEIGHTS)}")
    path = resolve_checkpoint(path)
    if path.is_file():
        return MultiTaskModel.load(path).eval()
    ckpt.verify(path, hashes=True)
    meta = ckpt.read_meta(path)
    model = MultiTaskModel(model_config_from_meta(meta, path))
    state = model.state_dict()
    tensors: dict[str, Any] = {"model": state}
    use_ema = weights == "ema" and bool(meta["recipe"]["train"].get("ema_decay"))
    if use_ema:
        tensors["ema"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ckpt.load(path, tensors)
    if use_ema:
        state.update(tensors["ema"])
    model.load_state_dict(state)
    return model.eval()
