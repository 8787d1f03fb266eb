"""Backbones built by name, bare or with default heads.

Each family package (``matris``, ``dpa4``) registers its named sizes with :func:`register`;
:func:`build_backbone` imports the family on first use. What a backbone provides is
:class:`~lampretrain.models.backbone.Backbone`.
"""

from __future__ import annotations

import importlib
from typing import Callable, Mapping

import torch

from .backbone import Backbone, check

_BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {}
_CONFIGS: dict[str, Callable[..., object]] = {}
_SAVED_BEFORE: dict[str, dict[int, dict]] = {}
# the saved-config format (multitask.CONFIG_FORMAT) that a plain ``saved_before`` mapping belongs to
_FIRST_CHANGE = 2


def register(name: str, configure: Callable[..., object], saved_before: Mapping | None = None):
    """Decorator: ``@register("matris-10m", configure)`` on a function ``(**overrides) -> Backbone``.

    ``configure(**overrides)`` returns the backbone's config without building weights, raising
    ``ValueError`` for an unknown or out-of-range option, so a recipe is checked before any model exists.
    ``saved_before``: options whose default changed since model configs were first saved, with the value
    they had before (MatRIS ``smooth=False``); a config saved before that change loads with them. Either
    ``{option: old value}`` (changed with config format 2) or ``{format: {option: old value}}``, the format
    (``multitask.CONFIG_FORMAT``) from which on the new default holds.
    """
    changes = dict(saved_before or {})
    if changes and not all(isinstance(k, int) for k in changes):
        changes = {_FIRST_CHANGE: changes}

    def wrap(fn: Callable[..., torch.nn.Module]):
        _BUILDERS[name] = fn
        _CONFIGS[name] = configure
        _SAVED_BEFORE[name] = {int(k): dict(v) for k, v in changes.items()}
        return fn

    return wrap


def available() -> list[str]:
    for family in ("matris", "dpa4"):
        importlib.import_module(f"{__name__}.{family}")
    return sorted(_BUILDERS)


def _registered(name: str) -> None:
    family = name.split("-")[0]
    if name not in _BUILDERS:
        try:
            importlib.import_module(f"{__name__}.{family}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{family}":
                raise
    if name not in _BUILDERS:
        raise ValueError(f"unknown model '{name}'; available: {', '.join(available())}")


def options_saved_before(name: str, saved_format: int = 1) -> dict:
    """The option values a model config saved at ``saved_format`` (1: before any saved format, e.g. a recipe-only
    checkpoint) implies: the old values of every default that changed after it (see :func:`register`)."""
    _registered(name)
    out: dict = {}
    for changed_at, before in sorted(_SAVED_BEFORE[name].items(), reverse=True):
        if saved_format < changed_at:
            out.update(before)  # the oldest change's value wins: it is what that config had
    return out


def build_backbone(name: str, **overrides) -> Backbone:
    """The registered backbone ``name`` with random weights; ``TypeError`` if it breaks the contract."""
    _registered(name)
    return check(_BUILDERS[name](**overrides))


def build(name: str, **overrides) -> torch.nn.Module:
    """A backbone with its default heads and random weights, e.g. ``build("matris-10m")``: a one-dataset
    (``"default"``) :class:`~lampretrain.models.multitask.MultiTaskModel`, ``model(batch)`` → energy, forces, stress."""
    from .multitask import DatasetSpec, HeadsConfig, MultiTaskConfig, MultiTaskModel  # multitask builds on this module

    backbone = build_backbone(name, **overrides)
    config = MultiTaskConfig(name, [DatasetSpec("default")], HeadsConfig.from_dict(backbone.default_heads), dict(overrides))
    return MultiTaskModel(config, backbone)


def configure(name: str, **overrides) -> object:
    """The config ``build(name, **overrides)`` would use; ``ValueError`` names a bad option."""
    _registered(name)
    return _CONFIGS[name](**overrides)


def graph_cutoffs(model: torch.nn.Module) -> tuple[float, float]:
    """(pair cutoff, three-body cutoff) in Å that the graphs of ``model`` (built on ``model.backbone``) need."""
    backbone: Backbone = model.backbone
    return float(backbone.cutoff), float(backbone.three_body_cutoff)
