"""A pretrained multi-task model (:func:`lampretrain.inference.loading.load_model`) made ready for fine-tuning:
new head, freezing, layer-wise LR decay.

Heads are kept, never re-initialised (fairchem resets them, and the step-0 error
jumps): a new dataset gets a new head whose energy MLP and element references
are copies of a named pretrained head, so at step 0 it predicts exactly what
that head predicts.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import ConfigError
from ..models.multitask import DatasetSpec, MultiTaskModel


def with_new_head(model: MultiTaskModel, spec: DatasetSpec, init_from: str) -> MultiTaskModel:
    """``model`` plus dataset ``spec.name`` whose energy head and references copy head ``init_from``.

    Per-dataset tensors (energy-head MLP stacks, the reference table) have the
    dataset on dim 0; the new row is row ``init_from``. ``spec``'s references
    are replaced by the copied ones (change-bias refits them afterwards).
    """
    if spec.name in model.dataset_names:
        raise ConfigError(f"finetune.head '{spec.name}' already exists in the checkpoint; drop init_from to reuse it")
    k = model.dataset_index(init_from)
    source = model.config.datasets[k]
    spec = replace(spec, element_references=dict(source.element_references))
    config = replace(model.config, datasets=[*model.config.datasets, spec])
    grown = MultiTaskModel(config, backbone=model.backbone)
    old = model.state_dict()
    n = len(model.dataset_names)
    new_state = {}
    for name, value in grown.state_dict().items():
        before = old[name]
        if before.shape != value.shape and before.dim() >= 1 and before.shape[0] == n and value.shape[0] == n + 1:
            new_state[name] = torch.cat([before, before[k : k + 1]])
        else:
            new_state[name] = before
    grown.load_state_dict(new_state)
    return grown


def backbone_depths(model: MultiTaskModel) -> dict[str, int]:
    """Depth of every backbone parameter from the output along ``backbone.layers()``: heads 0, last block 1, ...,
    embeddings L + 1 (L blocks).

    Parameters outside every layer (a final norm) count as depth 0 with the heads.
    """
    layers = model.backbone.layers()
    by_tensor = {id(p): len(layers) - k for k, layer in enumerate(layers) for p in layer.parameters()}
    return {f"backbone.{name}": by_tensor.get(id(p), 0) for name, p in model.backbone.named_parameters()}


def freeze(model: MultiTaskModel, mode: str, n_blocks: int = 0) -> list[str]:
    """Freeze the whole backbone or its embeddings and first ``n_blocks`` blocks; returns the frozen names."""
    if mode == "none":
        return []
    total = len(model.backbone.layers()) - 1  # after the embeddings
    if mode == "blocks" and n_blocks > total:
        raise ConfigError(f"finetune.freeze_blocks: {n_blocks} but the backbone has {total} blocks")
    depth = backbone_depths(model)
    params = dict(model.named_parameters())
    frozen = []
    for name, d in depth.items():
        if mode == "backbone" or d > total - n_blocks:
            params[name].requires_grad_(False)
            frozen.append(name)
    return frozen


def lr_scales(model: MultiTaskModel, decay: float) -> dict[str, float]:
    """Layer-wise learning-rate decay: parameter at depth d gets lr · decay^d (heads d = 0)."""
    if decay == 1.0:
        return {}
    return {name: decay**d for name, d in backbone_depths(model).items()}
