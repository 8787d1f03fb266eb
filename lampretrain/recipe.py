"""The pretraining recipe: one YAML file that fully describes a run, validated before anything starts.

Example (``recipes/*.yaml`` hold complete ones)::

    name: demo-matris
    output: outputs/demo-matris
    data: {store: outputs/demo/store, budget: 400, cost: {atoms: 1.0, angles: 0.02}}
    model: {name: matris-4m, options: {num_layers: 2}}
    objective: {energy: 5.0, forces: 5.0, stress: 0.1, magmoms: 0.1}
    optim: {lr: 3.0e-4, weight_decay: 1.0e-2}
    schedule: {kind: cosine, warmup_steps: 10}
    train: {steps: 200, grad_accum: 1, clip_grad_norm: 5.0, ema_decay: 0.999, eval_every: 50}
    engine: {name: ddp}
    checkpoint: {every: 50, keep: 3}
    tracking: {uri: null, experiment: lampretrain}

Every key is checked by :func:`lampretrain.config.from_dict` (an unknown key
names the allowed ones); ``--set train.lr=3e-4`` style overrides are applied
to the plain YAML data before validation, so they are checked the same way.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import ConfigError, apply_overrides, from_dict, load_yaml, override, to_dict


@dataclass
class CostSection:
    """Per-structure cost for rank balancing: atoms·a + edges·b + angles·c (see sampling.CostModel)."""

    atoms: float = 1.0
    edges: float = 0.0
    angles: float = 0.0

    def check(self) -> None:
        values = {"atoms": self.atoms, "edges": self.edges, "angles": self.angles}
        _at_least(values, 0.0)
        if not any(values.values()):
            raise ConfigError("atoms, edges, angles: at least one coefficient must be > 0")


@dataclass
class SamplingSection:
    """How datasets are mixed each epoch (sampling.mixing strategies)."""

    strategy: Literal["proportional", "temperature", "uniform", "explicit"] = "proportional"
    temperature: float = 2.0
    ratios: dict[str, float] = field(default_factory=dict)  # explicit: {dataset: ratio}
    epoch_size: int | None = None  # frames per epoch; default: every training frame once

    def check(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")
        _at_least({f"ratios.{k}": v for k, v in self.ratios.items()}, 0.0)
        if self.strategy == "explicit" and not self.ratios:
            raise ConfigError("ratios: strategy 'explicit' needs {dataset: ratio, ...}")
        _at_least({"epoch_size": self.epoch_size}, 1)


@dataclass
class WdsSection:
    """How ``data.format: wds`` streams the store's tar shards (sampling.stream, store.wds_shards.ShardStream)."""

    # frames per window: a rank holds one window of frames at a time and mixes them across its micro-batches
    shuffle_buffer: int = 4096
    # shards are shuffled in segments of at most this many frames (default: whole shards, read front to back);
    # smaller segments mix datasets and shards better at the cost of more shard openings per epoch
    segment: int | None = None
    # where shard files are read from: a template with {path}, the shard's path in the store (e.g. wds/train-00000.tar),
    # opened by webdataset's gopen: "https://host/mystore/{path}", "pipe:aws s3 cp s3://bucket/mystore/{path} -";
    # default: the store directory itself. The store's manifest and index are always read from data.store.
    url: str | None = None

    def check(self) -> None:
        _at_least({"shuffle_buffer": self.shuffle_buffer, "segment": self.segment}, 1)
        if self.url is not None and "{path}" not in self.url:
            raise ConfigError(f"url: '{self.url}' has no {{path}}; e.g. https://host/mystore/{{path}}")

    def shard_url(self, store: str, path: str) -> str:
        return str(Path(store) / path) if self.url is None else self.url.replace("{path}", path)


@dataclass
class DataSection:
    store: str  # directory written by `lampretrain prep`
    # lmdb: random access to LMDB shards (local disks); wds: each rank streams its WebDataset tar shards
    # front to back (shared filesystems, object stores: data.wds)
    format: Literal["lmdb", "wds"] = "lmdb"
    wds: WdsSection = field(default_factory=WdsSection)
    budget: float = 2000.0  # cost per rank and micro-batch (atoms with the default cost model)
    cost: CostSection = field(default_factory=CostSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    datasets: list[str] | None = None  # train on these datasets of the store only (default: all)
    max_natoms: int | None = None  # drop larger structures (deepmd's filter:N)
    split: str = "train"
    workers: int = 0  # DataLoader worker processes per rank
    # where edges and angles are built: in the loader workers, or by the trainer where the model runs (vesin-torch,
    # graph/device.py), for when the loader's CPUs are the bottleneck; validation always builds them in its loader
    graphs_on: Literal["loader", "device"] = "loader"

    def check(self) -> None:
        if not self.budget > 0:
            raise ConfigError(f"budget: must be > 0, got {self.budget}")
        if self.split not in ("train", "val", "test"):
            raise ConfigError(f"split: '{self.split}' is not one of train, val, test")
        _at_least({"max_natoms": self.max_natoms}, 1)
        _at_least({"workers": self.workers}, 0)

    def check_store(self) -> None:
        """What can only be checked against the store on disk: it exists and has the named datasets and
        frames. Called by the trainer before any process group or model exists (a recipe may be
        validated on a machine that does not hold its store, e.g. by ``launch``)."""
        from .store.index import StoreIndex

        index = StoreIndex.open(self.store)
        names = index.select(self.split, self.datasets, self.max_natoms).names
        if self.format == "wds":
            self.wds_shard_urls(index, self.split)
        stray = [n for n in self.sampling.ratios if n not in names]
        if stray:
            raise ConfigError(f"data.sampling.ratios: '{stray[0]}' is not among the trained datasets "
                              f"({', '.join(names)})")

    def wds_shard_urls(self, index, split: str) -> list[str]:
        """Shard k of ``split`` for ``data.format: wds``: its URL; a store without them or a missing local file is
        one line naming it and the fix."""
        from .store.index import StoreError, shard_name

        listed = {s["path"] for s in index.manifest["shards"].get("wds", []) if s["split"] == split}
        if not listed and (index.columns["split"] == ["train", "val", "test"].index(split)).any():
            written = ", ".join(index.manifest["shards"]) or "none"
            raise StoreError(f"data.format: wds but {index.root} has no WebDataset shards of split '{split}' (prep "
                             f"wrote formats: {written}); add wds to the prep spec's formats and re-run `lampretrain "
                             f"prep --overwrite`, or set data.format: lmdb")
        paths = [shard_name(split, k, "wds") for k in range(len(listed))]
        absent = [p for p in paths if p not in listed]
        if absent:
            raise StoreError(f"{index.root}/manifest.json lists no WebDataset shard {absent[0]}; re-run `lampretrain "
                             "prep --overwrite`")
        urls = [self.wds.shard_url(str(index.root), p) for p in paths]
        if self.wds.url is None:
            missing = [u for u in urls if not Path(u).is_file()]
            if missing:
                raise StoreError(f"{missing[0]}: WebDataset shard missing ({len(missing)} of {len(urls)} shards of "
                                 f"split '{split}'); restore it or re-run `lampretrain prep --overwrite`")
        return urls


@dataclass
class ModelSection:
    """A backbone made multi-task: per-dataset heads and element references (models.multitask)."""

    name: str  # a lampretrain.models.build name: matris-10m, matris-4m, dpa4-neo, dpa4-air, dpa4-plus, dpa4-pro
    options: dict[str, Any] = field(default_factory=dict)  # overrides of the family's config dataclass
    heads: dict[str, Any] = field(default_factory=dict)  # models.multitask.HeadsConfig keys

    def check(self) -> None:
        from .models import available, configure
        from .models.multitask import HeadsConfig

        if self.name not in available():
            raise ConfigError(f"name: unknown model '{self.name}'; available: {', '.join(available())}")
        override(configure(self.name), self.options, at="options")  # the schema of the family the name picks
        HeadsConfig.from_dict(self.heads)


@dataclass
class ObjectiveSection:
    """Loss weights per target (per-dataset weights and balancing live in ``options``, read by objectives)."""

    energy: float = 1.0  # on energy per atom
    forces: float = 1.0  # L2-norm MAE
    stress: float = 0.0
    magmoms: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)  # further objectives.ObjectiveConfig keys (balancing, ...)

    def config(self):
        """The objectives package's own config for these weights and options."""
        from .objectives import ObjectiveConfig

        data = {"energy_weight": self.energy, "force_weight": self.forces, "stress_weight": self.stress}
        data["magmom_weight"] = self.magmoms
        return from_dict(ObjectiveConfig, {**data, **self.options}, at="options")

    def check(self) -> None:
        typed = {"energy_weight": "energy", "force_weight": "forces", "stress_weight": "stress",
                 "magmom_weight": "magmoms"}
        clash = [k for k in self.options if k in typed]
        if clash:  # it would silently win over the typed weight
            raise ConfigError(f"options.{clash[0]}: set objective.{typed[clash[0]]} instead")
        self.config()


@dataclass
class OptimSection:
    name: Literal["adamw"] = "adamw"
    lr: float = 3e-4  # peak learning rate
    weight_decay: float = 1e-2  # on weight matrices; biases and norm gains only with decay_vectors
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    decay_vectors: bool = False  # true: decay every parameter (lampretrain before 2026-12)

    def check(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas: expected two numbers in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ConfigError(f"eps: must be > 0, got {self.eps}")
        _at_least({"weight_decay": self.weight_decay}, 0.0)


@dataclass
class ScheduleSection:
    """Learning rate per optimizer step: warmup then cosine, WSD (warmup-stable-decay) or constant."""

    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_start_factor: float = 0.0  # lr at step 0 as a fraction of the peak (DPA4: 0.2)
    decay_fraction: float = 0.65  # wsd: the last fraction of steps decays (DPA4: 0.65)
    min_lr: float = 0.0

    def check(self) -> None:
        _at_least({"warmup_steps": self.warmup_steps, "min_lr": self.min_lr}, 0)
        for key in ("warmup_start_factor", "decay_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{key}: must lie in [0, 1], got {getattr(self, key)}")


@dataclass
class TrainSection:
    steps: int = 1000  # optimizer steps of the whole run
    grad_accum: int = 1  # micro-batches per optimizer step
    clip_grad_norm: float | None = None
    ema_decay: float | None = None
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 10
    eval_every: int | None = None  # validate on the store's val split every N steps and at the end (None: never)
    progress: bool = True  # a progress bar on rank 0
    # CPU memory against speed: glibc's mmap threshold in MiB, auto (4 with a line graph, as MatRIS has) or null
    # (glibc's dynamic default). 4 halves dense MatRIS training's peak memory at 1.3-1.7x the step time: malloc.py
    malloc_mmap_threshold_mb: float | Literal["auto"] | None = None
    # after the last step, refit each head's element references on up to this many evenly spaced train frames
    # of its dataset (change-bias, train/references.py) before the final checkpoint; null: the prep references
    refit_references: int | None = None

    def check(self) -> None:
        _at_least({"steps": self.steps, "grad_accum": self.grad_accum, "log_every": self.log_every}, 1)
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ConfigError(f"clip_grad_norm: must be > 0 (or null for no clipping), got {self.clip_grad_norm}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay: must lie in (0, 1) (or null for no EMA), got {self.ema_decay}")
        if self.refit_references is not None and self.refit_references < 1:
            raise ConfigError(f"train.refit_references: frames per dataset must be >= 1 (or null), got "
                              f"{self.refit_references}")
        if isinstance(self.malloc_mmap_threshold_mb, float) and not 0 < self.malloc_mmap_threshold_mb < 2048:
            raise ConfigError(f"train.malloc_mmap_threshold_mb: mallopt takes 0 < MiB < 2048, got "
                              f"{self.malloc_mmap_threshold_mb} (auto or null for the defaults)")
        if self.eval_every is not None and self.eval_every < 1:
            raise ConfigError(f"eval_every: must be >= 1 (or null for no validation), got {self.eval_every}")


# why train/engines/deepspeed.py refuses ZeRO-2 with accumulation; the recipe says it before anything starts
ZERO2_ACCUMULATION = (
    "deepspeed ZeRO-2 with train.grad_accum {grad_accum}: deepspeed 0.17.6 keeps only the last micro-batch's "
    "reduced gradient partition (see lampretrain/train/engines/deepspeed.py); use engine.zero_stage 1 or 3 "
    "(or fsdp), or grad_accum 1 with a larger data.budget"
)


@dataclass
class EngineSection:
    name: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    zero_stage: int = 2  # deepspeed only: 1, 2 or 3 (see train/engines/deepspeed*.py)
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    find_unused_parameters: bool = False  # ddp: parameters that never reach the loss (MatRIS's last bond update)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # extra DeepSpeed config keys, merged last

    def check(self) -> None:
        if self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"zero_stage: {self.zero_stage} is not 1, 2 or 3")


@dataclass
class CheckpointSection:
    every: int = 1000  # optimizer steps between checkpoints (and one at the end, and on SIGTERM/SIGUSR1)
    keep: int = 3  # keep the last K complete checkpoints (0: keep all)
    verify: bool = True  # check file sizes and SHA-256 before loading

    def check(self) -> None:
        _at_least({"every": self.every}, 1)
        _at_least({"keep": self.keep}, 0)


@dataclass
class TrackingSection:
    enabled: bool = True
    uri: str | None = None  # MLflow tracking URI; default: a local file store under the run directory
    experiment: str = "lampretrain"
    run_name: str | None = None
    parent_run_id: str | None = None  # log as a child of this MLflow run (one sweep's trials)


@dataclass
class Recipe:
    name: str
    data: DataSection
    model: ModelSection
    output: str = "outputs/run"  # run directory: checkpoints/, mlruns/, recipe.yaml
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    engine: EngineSection = field(default_factory=EngineSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    def __post_init__(self):
        if self.engine.name == "deepspeed" and self.engine.zero_stage == 2 and self.train.grad_accum > 1:
            raise ConfigError("engine.zero_stage: " + ZERO2_ACCUMULATION.format(grad_accum=self.train.grad_accum))
        if self.train.refit_references and self.model.heads.get("trainable_references"):
            raise ConfigError("train.refit_references: the references are trainable (model.heads.trainable_references), "
                              "so the optimizer already fits them; drop one of the two")


def _at_least(values: dict[str, float | int | None], low: float | int) -> None:
    """Each value (None: unset) must be >= ``low``; the error names the key."""
    for key, value in values.items():
        if value is not None and not value >= low:
            raise ConfigError(f"{key}: must be >= {low}, got {value}")


def _number_literal(override: str) -> str:
    """``lr=3e-4`` → ``lr=0.0003``: YAML 1.1 reads a float without a dot as a string."""
    key, sep, raw = override.partition("=")
    if sep and isinstance(yaml.safe_load(raw), str):
        try:
            return f"{key}={float(raw)!r}"
        except ValueError:
            pass
    return override


def parse_recipe(data: dict[str, Any], overrides: list[str] | None = None, where: str = "recipe") -> Recipe:
    """Validate plain data (after ``key.path=value`` overrides) into a :class:`Recipe`."""
    overrides = [_number_literal(o) for o in overrides or []]
    return from_dict(Recipe, apply_overrides(copy.deepcopy(data), overrides), where)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a recipe YAML; errors name the file and the key."""
    return parse_recipe(load_yaml(path), overrides, where=str(path))


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data (saved with checkpoints, logged as MLflow params)."""
    return to_dict(recipe)
