"""Fine-tuning pretrained checkpoints (change-bias, new heads, freezing, LR decay, replay, LoRA) and Ray Tune sweeps."""

import importlib

# Imported on first use (PEP 562), not with the package: `lampretrain --help` reaches finetune/cli.py through this
# package, and the fine-tuning run pulls in torch and the whole training stack.
_EXPORTS = {"FinetuneRecipe": ".recipe", "load_finetune": ".recipe", "parse_finetune": ".recipe",
            "FinetuneResult": ".run", "finetune": ".run"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
