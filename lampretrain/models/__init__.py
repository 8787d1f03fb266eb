"""Backbones with default heads, built by name.

Each family package (``matris``, ``dpa4``) registers its named sizes with
:func:`register`; :func:`build` imports the family on first use.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

_BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {}


def register(name: str):
    """Decorator: ``@register("matris-10m")`` on a function ``(**overrides) -> nn.Module``."""

    def wrap(fn: Callable[..., torch.nn.Module]):
        _BUILDERS[name] = fn
        return fn

    return wrap


def available() -> list[str]:
    for family in ("matris", "dpa4"):
        importlib.import_module(f"{__name__}.{family}")
    return sorted(_BUILDERS)


def build(name: str, **overrides) -> torch.nn.Module:
    """A backbone with default heads and random weights, e.g. ``build("matris-10m")``."""
    family = name.split("-")[0]
    if name not in _BUILDERS:
        try:
            importlib.import_module(f"{__name__}.{family}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{family}":
                raise
    if name not in _BUILDERS:
        raise ValueError(f"unknown model '{name}'; available: {', '.join(available())}")
    return _BUILDERS[name](**overrides)


def graph_cutoffs(model: torch.nn.Module) -> tuple[float, float]:
    """(pair cutoff, three-body cutoff) in Å that the model's graphs must be built with."""
    backbone = getattr(model, "backbone", model)
    config = getattr(backbone, "config", None)
    return float(getattr(config, "cutoff", 6.0)), float(getattr(config, "three_body_cutoff", 0.0))
