"""A backbone turned multi-task: per-dataset energy heads and element references, shared F/σ.

E_g = Σ_{i∈g} [head_{k(g)}(h_i) + ref_{k(g)}(Z_i)], with k(g) = ``batch.dataset[g]``;
F = −∂E/∂x and σ = (1/V) ∂E/∂ε are shared by every dataset (conservative), or the
forces come from a vector head in a first, direct stage (UMA/eSEN style) and the
trainer later calls :meth:`MultiTaskModel.set_force_mode` ("conservative").
Optional heads: magnetic moments |MLP(h_i)| and DeNS denoising (``heads.denoising``).

The model is described by :class:`MultiTaskConfig` (backbone name and options,
datasets with their references and scales, heads); :meth:`MultiTaskModel.save`
stores config + state_dict and :meth:`MultiTaskModel.load` rebuilds it, so a
checkpoint can be evaluated on any of its datasets by name.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Mapping

import torch

from ..config import ConfigError, from_dict
from ..graph.batch import GraphBatch, edge_vectors
from ..model_files import read_model_file
from . import build_backbone, options_saved_before
from .backbone import Backbone, without_retired
from .conservative import energy_forces_stress
from .heads import (
    Corruption,
    DenoisingConfig,
    EdgeVectorHead,
    ElementReferences,
    EnergyHeads,
    EquivariantVectorHead,
    VectorCondition,
    clamp_to_median,
    reference_table,
    sample_corruption,
)
from .layers.mlp import MLP
from .layers.scatter import scatter_sum

FORCE_MODES = ("conservative", "direct")
# saved model configs: 2 since MatRIS became smooth by default, 3 since DPA4 took deepmd-kit's RMSNorm ε and attention
# null ε (models.options_saved_before gives what an older format implied)
CONFIG_FORMAT = 3


@dataclass
class DatasetSpec:
    """One training dataset as the heads and the loss see it; numbers from the store's ``stats.json``."""

    name: str
    element_references: dict[int, float] = field(default_factory=dict)  # eV per atom of Z (float64 lstsq)
    energy_rms: float = 1.0  # per-atom RMS of E − Σ refs, eV/atom (static loss normalisation)
    force_rms: float = 1.0  # RMS force component, eV/Å (static loss normalisation)

    def __post_init__(self) -> None:
        for key in ("energy_rms", "force_rms"):
            if not getattr(self, key) > 0:
                raise ValueError(f"dataset '{self.name}': {key} must be > 0 (it divides the loss), got {getattr(self, key)}")

    @classmethod
    def from_stats(cls, name: str, stats: Mapping[str, Any]) -> "DatasetSpec":
        """From one dataset's entry of ``stats.json`` (keys element_references, residual_per_atom_rms, force_rms)."""
        refs = {int(z): float(v) for z, v in (stats.get("element_references") or {}).items()}
        energy_rms = stats.get("residual_per_atom_rms") or 1.0
        force_rms = stats.get("force_rms") or 1.0
        return cls(name=name, element_references=refs, energy_rms=float(energy_rms), force_rms=float(force_rms))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DatasetSpec":
        """From :meth:`to_dict`'s plain data (JSON keys Z as strings), by the one config validator."""
        out = dict(data)
        out["element_references"] = {int(z): v for z, v in (data.get("element_references") or {}).items()}
        return from_dict(cls, out, f"dataset '{data.get('name', '?')}'")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["element_references"] = {str(z): v for z, v in self.element_references.items()}
        return out


@dataclass
class HeadsConfig:
    per_dataset: bool = True  # one energy head per dataset; False: one shared head (references stay per dataset)
    hidden: tuple[int, ...] = (128, 128)
    glu: bool = False  # hidden layers a ⊙ SiLU(g) of a 2×-wide linear map (deepmd-kit's DPA4 fitting net)
    output_scale: Literal["force_rms", "none"] = "force_rms"  # per-dataset head output × force RMS (EnergyHeads)
    trainable_references: bool = False
    force_mode: Literal["conservative", "direct"] = "conservative"  # "direct": forces from a vector head
    direct_force_head: bool = False  # build the direct-force head even when starting conservative
    magmoms: bool = False
    vector_hidden: int = 64
    denoising: DenoisingConfig = field(default_factory=DenoisingConfig)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HeadsConfig":
        """Validated by the one config validator (keys, types, choices, ranges)."""
        return from_dict(cls, dict(data), at="heads")


@dataclass
class MultiTaskConfig:
    backbone: str  # registry name, e.g. "matris-4m", "dpa4-neo"
    datasets: list[DatasetSpec]
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    backbone_options: dict[str, Any] = field(default_factory=dict)
    # where the weights came from when not from lampretrain (models/foreign.py): the format and the source's
    # own settings its writer needs back (MatRIS is_intensive, ...); fine-tuning keeps it
    origin: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [d.name for d in self.datasets]
        if not names:
            raise ValueError("multi-task model: 'datasets' is empty")
        if len(set(names)) != len(names):
            raise ValueError(f"multi-task model: duplicate dataset names in {names}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MultiTaskConfig":
        """From :meth:`to_dict`'s plain data (a checkpoint's ``meta.json``), by the one config validator."""
        out = dict(data)
        out["datasets"] = [d if isinstance(d, DatasetSpec) else DatasetSpec.from_dict(d) for d in data.get("datasets", [])]
        saved = out.pop("format", 1)
        if saved < CONFIG_FORMAT and "backbone" in out:
            # saved before the backbone's defaults changed: what it left unnamed had the defaults of then
            before = options_saved_before(out["backbone"], saved)
            out["backbone_options"] = {**before, **(out.get("backbone_options") or {})}
        return from_dict(cls, out, "model")

    def to_dict(self) -> dict[str, Any]:
        heads = asdict(self.heads)
        heads["hidden"] = list(self.heads.hidden)
        return {
            "format": CONFIG_FORMAT,
            "backbone": self.backbone,
            "datasets": [d.to_dict() for d in self.datasets],
            "heads": heads,
            "backbone_options": dict(self.backbone_options),
            "origin": dict(self.origin),
        }

    @property
    def dataset_names(self) -> list[str]:
        return [d.name for d in self.datasets]


class MultiTaskModel(torch.nn.Module):
    """Backbone + per-dataset energy heads and references (+ direct-force, magmom, denoising heads)."""

    def __init__(self, config: MultiTaskConfig, backbone: Backbone | None = None):
        super().__init__()
        self.config = config
        heads = config.heads
        self.backbone = backbone if backbone is not None else build_backbone(config.backbone, **config.backbone_options)
        channels = self.backbone.node_channels
        n = len(config.datasets)
        force_rms = torch.tensor([d.force_rms for d in config.datasets], dtype=torch.float64)
        scales = clamp_to_median(force_rms, 10.0) if heads.output_scale == "force_rms" else torch.ones(n)
        self.energy_heads = EnergyHeads(channels, heads.hidden, scales, heads.per_dataset, heads.glu)
        self.references = ElementReferences(
            reference_table([d.element_references for d in config.datasets]), heads.trainable_references
        )
        self.magmom_head = MLP(channels, [heads.vector_hidden], 1) if heads.magmoms else None
        wants_direct = heads.direct_force_head or heads.force_mode == "direct"
        self.force_head = self._vector_head(None) if wants_direct else None
        self.denoise_head = self._vector_head(heads.denoising.std) if heads.denoising.enabled else None

    def _vector_head(self, sigma_ref: float | None) -> torch.nn.Module:
        backbone, hidden = self.backbone, self.config.heads.vector_hidden
        if backbone.vector_channels:
            return EquivariantVectorHead(backbone.node_channels, hidden, sigma_ref, backbone.vector_channels)
        return EdgeVectorHead(backbone.node_channels, hidden, backbone.cutoff, sigma_ref=sigma_ref)

    @property
    def dataset_names(self) -> list[str]:
        return self.config.dataset_names

    @property
    def force_mode(self) -> str:
        return self.config.heads.force_mode

    def set_force_mode(self, mode: str) -> None:
        """Switch between direct (vector head) and conservative (−∂E/∂x) forces, e.g. after a first stage."""
        if mode not in FORCE_MODES:
            raise ValueError(f"force mode '{mode}' not one of {', '.join(FORCE_MODES)}")
        if mode == "direct" and self.force_head is None:
            raise ValueError("direct forces need the direct-force head: set heads.direct_force_head: true")
        self.config = replace(self.config, heads=replace(self.config.heads, force_mode=mode))

    def dataset_index(self, name: str) -> int:
        names = self.dataset_names
        if name not in names:
            raise ConfigError(f"unknown dataset '{name}'; this model has: {', '.join(names)}")
        return names.index(name)

    def for_dataset(self, batch: GraphBatch, name: str) -> GraphBatch:
        """The batch with every graph assigned to dataset ``name`` (its head and references)."""
        return replace(batch, dataset=torch.full_like(batch.dataset, self.dataset_index(name)))

    def graph_energy(self, batch: GraphBatch, scalar: torch.Tensor) -> torch.Tensor:
        """E_g = Σ_i head_{k(g)}(h_i) + Σ_i ref_{k(g)}(Z_i), (G,); the reference sum in float64."""
        g = batch.n_atoms.shape[0]
        atom_dataset = batch.dataset[batch.batch]  # (N,)
        learned = scatter_sum(self.energy_heads(scalar, atom_dataset), batch.batch, g)
        reference = scatter_sum(self.references(batch.numbers, atom_dataset), batch.batch, g)
        return (learned.to(torch.float64) + reference).to(scalar.dtype)

    def energy(self, batch: GraphBatch, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        return self.graph_energy(batch, self.backbone.node_features(batch, positions, cell).scalar)

    def _vectors(
        self, head: torch.nn.Module, batch: GraphBatch, seen: dict[str, torch.Tensor], cond: VectorCondition | None
    ) -> torch.Tensor:
        if self.backbone.vector_channels:
            return head(seen["scalar"], seen["vector"], cond)
        vectors = edge_vectors(seen["positions"], seen["cell"], batch)
        return head(seen["scalar"], batch.edge_index, vectors, cond)

    def forward(
        self,
        batch: GraphBatch,
        compute_forces: bool = True,
        compute_stress: bool = True,
        dataset: str | None = None,
        corruption: Corruption | None = None,
    ) -> dict[str, torch.Tensor]:
        """energy (G,), forces (N, 3), stress (G, 3, 3), magmoms (N,) when built.

        With denoising on, in training (or when ``corruption`` is given) positions are
        displaced first and the output adds noise_pred/noise_target (N, 3), noise_mask (N,)
        and noisy (G,). ``dataset`` evaluates every graph with that dataset's head.
        """
        if dataset is not None:
            batch = self.for_dataset(batch, dataset)
        den = self.config.heads.denoising
        if corruption is None and self.training and self.denoise_head is not None:
            corruption = sample_corruption(batch, den)
        if corruption is not None:
            if self.denoise_head is None:
                raise ValueError("a corruption was given but the model has no denoising head (heads.denoising.enabled)")
            batch = replace(batch, positions=batch.positions + corruption.noise)
        seen: dict[str, torch.Tensor] = {}

        def energy_fn(positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
            scalar, vector = self.backbone.node_features(batch, positions, cell)
            seen.update(scalar=scalar, vector=vector, positions=positions, cell=cell)
            return self.graph_energy(batch, scalar)

        direct = self.force_mode == "direct"
        out = energy_forces_stress(
            energy_fn, batch, compute_forces and not direct, compute_stress, create_graph=self.training
        )
        if compute_forces and direct:
            out["forces"] = self._vectors(self.force_head, batch, seen, None)
        if self.magmom_head is not None:
            out["magmoms"] = self.magmom_head(seen["scalar"]).squeeze(-1).abs()
        if corruption is not None:
            given = corruption.displaced & batch.forces_mask if den.encode_forces else torch.zeros_like(corruption.displaced)
            cond = VectorCondition(sigma=corruption.sigma, force=batch.forces * given[:, None])
            out["noise_pred"] = self._vectors(self.denoise_head, batch, seen, cond)
            out["noise_target"] = corruption.target
            out["noise_mask"] = corruption.displaced
            out["noisy"] = corruption.noisy
        return out

    def checkpoint(self) -> dict[str, Any]:
        """Config (plain types) and weights: everything :meth:`load` needs."""
        return {"config": self.config.to_dict(), "state_dict": self.state_dict()}

    def save(self, path: str | os.PathLike) -> None:
        torch.save(self.checkpoint(), path)

    @classmethod
    def load(cls, source: str | os.PathLike | Mapping[str, Any], map_location: str | torch.device = "cpu") -> "MultiTaskModel":
        """Rebuild from :meth:`save`'s file (read with ``weights_only=True``) or :meth:`checkpoint`'s dict."""
        ckpt = source if isinstance(source, Mapping) else read_model_file(source, ("config", "state_dict"), map_location)
        model = cls(MultiTaskConfig.from_dict(ckpt["config"]))
        state = without_retired(ckpt["state_dict"], model.backbone)  # files written before the change load
        model.load_state_dict(state, assign=True)  # keeps the saved dtypes (float64 references)
        return model
