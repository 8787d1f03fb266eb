"""Using trained models: the ASE calculator, evaluation with plots, stability check, export."""

import importlib

# Imported on first use (PEP 562), not with the package: `lampretrain --help` reaches inference/cli.py through this
# package, and the calculator pulls in torch and the models.
_EXPORTS = {"Calculator": ".calculator", "load_model": ".loading"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
