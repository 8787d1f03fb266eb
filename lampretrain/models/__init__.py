"""Backbones with default heads, built by name.

Each family package (``matris``, ``dpa4``) registers its named sizes with
:func:`register`; :func:`build` imports the family on first use.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

_BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {}
_CONFIGS: dict[str, Callable[..., object]] = {}


def register(name: str, configure: Callable[..., object]):
    """Decorator: ``@register("matris-10m", configure)`` on a function ``(**overrides) -> nn.Module``.

    ``configure(**overrides)`` returns the backbone's config without building weights, raising
    ``ValueError`` for an unknown or out-of-range option, so a recipe is checked before any model exists.
    """

    def wrap(fn: Callable[..., torch.nn.Module]):
        _BUILDERS[name] = fn
        _CONFIGS[name] = configure
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


def build(name: str, **overrides) -> torch.nn.Module:
    """A backbone with default heads and random weights, e.g. ``build("matris-10m")``."""
    _registered(name)
    return _BUILDERS[name](**overrides)


def configure(name: str, **overrides) -> object:
    """The config ``build(name, **overrides)`` would use; ``ValueError`` names a bad option."""
    _registered(name)
    return _CONFIGS[name](**overrides)


def graph_cutoffs(model: torch.nn.Module) -> tuple[float, float]:
    """(pair cutoff, three-body cutoff) in Å that the model's graphs must be built with."""
    backbone = getattr(model, "backbone", model)
    config = getattr(backbone, "config", None)
    return float(getattr(config, "cutoff", 6.0)), float(getattr(config, "three_body_cutoff", 0.0))
