"""The fine-tuning recipe: a pretraining recipe plus a ``finetune`` section, over the checkpoint's own recipe.

Example (``recipes/finetune-*.yaml`` hold complete ones)::

    name: finetune-feo
    output: outputs/finetune-feo
    data: {store: outputs/feo/store, budget: 96}
    finetune:
      head: feo                     # the head trained on the new data
      init_from: mp_pbeu            # a new head, copied from this pretrained one (omit: ``head`` must exist)
      refit_references: true        # change-bias before step 0
      freeze: blocks                # none | backbone | blocks (the embeddings and the first ``freeze_blocks``)
      freeze_blocks: 1
      lr_decay: 0.8                 # layer-wise: lr · decay^depth, depth 0 at the heads
      replay: {store: outputs/demo/store, ratio: 0.3}
    property: {csv: props.csv, columns: [band_gap]}   # optional: a property head instead of energies
    optim: {lr: 5.0e-4}
    train: {steps: 200}

Missing sections (``model``, ``objective``, ``engine``, ...) come from the
checkpoint's resolved recipe; keys given here replace the checkpoint's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import ConfigError, apply_overrides, from_dict, load_yaml
from ..recipe import Recipe, _number_literal


@dataclass
class ReplaySection:
    """Pretraining data mixed in, each dataset on its own pretrained head (multi-head replay)."""

    store: str | None = None  # the pretraining store; None: no replay
    ratio: float = 0.0  # fraction of micro-batches drawn from it, in [0, 1)
    datasets: list[str] | None = None  # default: every dataset of the store the checkpoint has a head for
    budget: float | None = None  # cost per replay micro-batch (default: data.budget)

    def check(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"ratio: must be in [0, 1), got {self.ratio}")
        if self.ratio > 0 and not self.store:
            raise ConfigError("store: replay.ratio > 0 needs the pretraining store")


@dataclass
class LoraSection:
    """Low-rank adapters W + (alpha/rank)·B·A on the backbone's linear layers; the base weights stay frozen."""

    rank: int = 0  # 0: off
    alpha: float = 1.0

    def check(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"rank: must be >= 0, got {self.rank}")


@dataclass
class FinetuneSection:
    checkpoint: str | None = None  # the pretrained checkpoint directory (the command's --from sets it)
    head: str | None = None  # the head trained on data.datasets[0]; default: that dataset's name
    init_from: str | None = None  # make ``head`` new, initialised from this pretrained head
    refit_references: bool = True  # change-bias: least-absolute fit of label − prediction before step 0
    freeze: Literal["none", "backbone", "blocks"] = "none"
    freeze_blocks: int = 0  # freeze: blocks — the embeddings and this many first interaction blocks
    lr_decay: float = 1.0  # layer-wise learning-rate decay per depth (1: off)
    use_ema: bool = True  # start from the checkpoint's EMA weights when it has them
    eval_split: Literal["train", "val", "test"] | None = "val"  # evaluated at every log (val_mae, what sweeps rank)
    replay: ReplaySection = field(default_factory=ReplaySection)
    lora: LoraSection = field(default_factory=LoraSection)

    def check(self) -> None:
        if not 0.0 < self.lr_decay <= 1.0:
            raise ConfigError(f"lr_decay: must be in (0, 1], got {self.lr_decay}")
        if self.freeze_blocks < 0:
            raise ConfigError(f"freeze_blocks: must be >= 0, got {self.freeze_blocks}")


@dataclass
class PropertySection:
    """A downstream per-structure target from a CSV keyed by structure id, on the pooled backbone features.

    With ``csv`` set the run trains this head (``finetune.property``) instead of energies and forces;
    ``head``, ``init_from``, ``refit_references``, ``replay`` and ``objective`` do not apply.
    """

    csv: str | None = None  # None: no property head
    key: Literal["hash", "source"] = "hash"  # the id column holds the store's content hash or the frame's source
    id_column: str = "id"
    columns: list[str] = field(default_factory=list)  # target column(s); several make a vector target
    pooling: Literal["mean", "sum"] = "mean"  # over the atoms of a structure
    hidden: list[int] = field(default_factory=lambda: [64])
    loss: Literal["mae", "mse"] = "mae"  # on the targets standardised by their training mean and std
    graphs: int = 16  # structures per batch

    def check(self) -> None:
        if self.csv and not self.columns:
            raise ConfigError("columns: name the CSV's target column(s)")
        if self.id_column in self.columns:
            raise ConfigError(f"columns: '{self.id_column}' is the id column")
        if self.graphs < 1:
            raise ConfigError(f"graphs: must be >= 1, got {self.graphs}")


@dataclass
class FinetuneRecipe(Recipe):
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    property: PropertySection = field(default_factory=PropertySection)

    def __post_init__(self):
        super().__post_init__()
        if self.train.refit_references:
            raise ConfigError("train.refit_references: fine-tuning refits its head's references before step 0 "
                              "(finetune.refit_references); run `lampretrain change-bias` on the result for a refit after")


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge: ``top`` wins; dicts merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def checkpoint_recipe(checkpoint: str | Path) -> dict[str, Any]:
    from ..train.checkpoint import read_meta, resolve

    return read_meta(resolve(checkpoint, hashes=False))["recipe"]


FRESH = ("output", "name", "data", "checkpoint", "tracking")  # per run, never inherited from pretraining


def parse_finetune(
    data: dict[str, Any], checkpoint: str | None = None, overrides: list[str] | None = None, where: str = "recipe"
) -> FinetuneRecipe:
    """The fine-tuning recipe: checkpoint recipe (minus run-specific sections) ← ``data`` ← overrides."""
    data = copy.deepcopy(data)
    if checkpoint is not None:
        data.setdefault("finetune", {})["checkpoint"] = str(checkpoint)
    data = apply_overrides(data, [_number_literal(o) for o in overrides or []])
    source = (data.get("finetune") or {}).get("checkpoint")
    if not source:
        raise ConfigError(f"{where}: no checkpoint to fine-tune: pass --from CHECKPOINT or set finetune.checkpoint")
    if not (Path(source) / "meta.json").exists():  # a run directory: its newest checkpoint (or why there is none)
        from ..train.checkpoint import resolve

        source = str(resolve(source, hashes=False))
        data["finetune"]["checkpoint"] = source
    base = {k: v for k, v in checkpoint_recipe(source).items() if k not in FRESH}
    train = base.setdefault("train", {})
    # the pretraining run's length, its validation cadence and its end-of-run refit, all on its own store
    for key in ("steps", "eval_every", "refit_references"):
        train.pop(key, None)
    return from_dict(FinetuneRecipe, _merge(base, data), where)


def load_finetune(path: str | Path, checkpoint: str | None = None, overrides: list[str] | None = None) -> FinetuneRecipe:
    return parse_finetune(load_yaml(path), checkpoint, overrides, where=str(path))
